// Errors the HTTP API answers with a status and a JSON body: `{ "error": { "message", "type", "param"? } }`
// on OpenAI paths, `{ "error": "<message>" }` on Open Inference ones (http.ts errorBody).
export class HttpError extends Error {
  /** The request field at fault (OpenAI's `param`), when one is. */
  readonly param?: string;

  constructor(readonly statusCode: number, message: string, readonly type = 'invalid_request_error', param?: string) {
    super(message);
    if (param !== undefined) this.param = param;
  }
}
