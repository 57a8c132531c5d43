// The polling helper lives with the services (the bench uses it too); tests import it from here.
export { until } from '../../services/core/until.js';
