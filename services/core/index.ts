// The package's main entry point (`import ... from 'switchyard'`): the core that every service shares.
export { initBackend, describeBackend, backendInfo, BACKEND_CHOICES, type BackendInfo, type BackendChoice } from './backend.js';
export { parseModelConfig, preset, resolvePreset, ConfigError, type ModelConfig, type MixtralConfig, type DeepseekConfig, type TrainSettings, type GateSettings } from './config.js';
export * as gating from './gating/index.js';
export { MixtralModel, crossEntropy, type LossResult, type PassOptions } from './model/model.js';
export { ExpertSet, InProcessTransport, type ExpertTransport, type RowBatch } from './model/experts.js';
export { expertForward, expertBackward, transposeExpert, type ExpertWeights, type ExpertBiases, type ExpertParams, type ExpertActivation } from './model/expert.js';
export { AdamW, clipFactor, gradSquareSum } from './optim/adamw.js';
export { learningRate } from './optim/schedule.js';
export { loadCheckpoint, saveCheckpoint, CheckpointError } from './checkpoint/index.js';
export { modelTensorShapes } from './model/hf.js';
export { familyOf, type ModelFamily } from './model/family.js';
export { loadModel, saveModel } from './checkpoint/model.js';
export { train, type TrainRunOptions, type TrainSummary } from './train/trainer.js';
export { Sampler, checkSampling, SamplingError, type SamplingOptions } from './sampling.js';
// The serving engine lives with the router; in-process generation is part of the public API.
export { generate, Scheduler, type Generation, type SchedulerOptions } from '../router/scheduler.js';
export { encodeText, decodeIds } from './data/bytes.js';
export { loadTokenizer, byteTokenizer, CompletionText, TokenizerError, type TextTokenizer } from './tokenizer/index.js';
export { loadCorpus, BatchSampler, CorpusError } from './data/corpus.js';
