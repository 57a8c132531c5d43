// Errors the HTTP API answers with a status and a JSON body `{ "error": { "message", "type" } }`.
export class HttpError extends Error {
  constructor(readonly statusCode: number, message: string, readonly type = 'invalid_request_error') {
    super(message);
  }
}
