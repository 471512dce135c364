/**
 * A typed client of the server extension's `/offgrid/v1` routes.
 *
 * The types come from `api.ts`, which `jlpm gen:api` generates from the server's own
 * `openapi.json`; `ROUTES` names every operation of that document with its method and
 * path, and `test/drift.test.ts` fails when either falls behind the document. Requests go
 * through whatever `Fetch` it is given: in JupyterLab that is `ServerConnection.makeRequest`
 * (Jupyter's token, cookie and XSRF handling), in unit tests a fake.
 */

import type { components } from './api';
import { readEvents } from './sse';

export type Schemas = components['schemas'];
export type SessionSummary = Schemas['SessionSummary'];
export type Session = Schemas['Session'];
export type Message = Schemas['Message'];
export type SessionList = Schemas['SessionList'];
export type ChatResponse = Schemas['ChatResponse'];
export type GenerationStatus = Schemas['GenerationStatus'];
export type Stats = Schemas['Stats'];
export type SessionExport = Schemas['SessionExport'];
export type ProposalRequest = Omit<Schemas['ProposalRequest'], 'stream'>;
export type Proposal = Schemas['Proposal'];
export type InlineCompletionRequest = Schemas['InlineCompletionRequest'];
export type InlineCompletionResponse = Schemas['InlineCompletionResponse'];

/** Sends one request to a path under `/offgrid/v1/`. */
export type Fetch = (path: string, init: RequestInit) => Promise<Response>;

/** Every operation of openapi.json: [method, path]. */
export const ROUTES = {
  listSessions: ['GET', '/sessions'],
  createSession: ['POST', '/sessions'],
  getSession: ['GET', '/sessions/{ref}'],
  updateSession: ['PATCH', '/sessions/{ref}'],
  deleteSession: ['DELETE', '/sessions/{ref}'],
  addMessage: ['POST', '/sessions/{ref}/messages'],
  forkSession: ['POST', '/sessions/{ref}/fork'],
  exportSession: ['GET', '/sessions/{ref}/export'],
  importSession: ['POST', '/import'],
  notebookSession: ['GET', '/notebooks/session'],
  bindNotebook: ['PUT', '/notebooks/session'],
  chat: ['POST', '/sessions/{ref}/chat'],
  propose: ['POST', '/sessions/{ref}/proposals'],
  followTurn: ['GET', '/sessions/{ref}/turn'],
  generationStatus: ['GET', '/generation/status'],
  cancelGeneration: ['POST', '/generation/cancel'],
  stats: ['GET', '/stats'],
  statsRequests: ['GET', '/stats/requests'],
  listProfiles: ['GET', '/profiles'],
  listTools: ['GET', '/tools'],
  listCollections: ['GET', '/collections'],
  learn: ['POST', '/collections'],
  getCollection: ['GET', '/collections/{name}'],
  deleteCollection: ['DELETE', '/collections/{name}'],
  searchCollection: ['GET', '/collections/{name}/search'],
  models: ['GET', '/models'],
  health: ['GET', '/health'],
  chatCompletions: ['POST', '/chat/completions'],
  openapi: ['GET', '/openapi.json'],
  completeInline: ['POST', '/completions/inline']
} as const;

export type Operation = keyof typeof ROUTES;

/** An error answered by the server: its `{"error": {message, type, code}}` and the status. */
export class OffgridRequestError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string,
    readonly type: string
  ) {
    super(message);
    this.name = 'OffgridRequestError';
  }
}

/** The events of a streamed chat turn, as the server sends them. */
export type ChatEvent =
  | { event: 'waiting'; data: { session_id: string; reason: string; waited_s: number } }
  | { event: 'queued'; data: { position: number } }
  | { event: 'start'; data: { request_id?: string } }
  | { event: 'loading'; data: Record<string, unknown> }
  | { event: 'token'; data: { delta: string } }
  | { event: 'round_start'; data: { round: number; max_rounds: number } }
  | { event: 'tool_start'; data: { tool_name: string; arguments: Record<string, unknown> } }
  | { event: 'tool_end'; data: { tool_name: string; result?: string; error?: string; duration_ms: number } }
  | { event: 'complete'; data: ChatResponse }
  | { event: 'error'; data: { message: string; type: string; code: string } }
  | { event: string; data: any };

export interface ChatOptions {
  max_tokens?: number;
  temperature?: number;
  metadata?: Record<string, unknown>;
  /** Attached variables, cells or a selection (stored in the user message's metadata.context). */
  context?: Schemas['Attachment'][];
  signal?: AbortSignal;
}

/** The rows of `GET stats/requests`, one object per request. */
export type RequestRow = Record<string, string | number | null>;

export class OffgridClient {
  constructor(private readonly fetch: Fetch) {}

  /** The path of *op* with its `{ref}` filled in (URL-encoded) and a query string. */
  static path(op: Operation, ref?: string, query?: Record<string, string | number | undefined>): string {
    let path: string = ROUTES[op][1];
    if (path.includes('{ref}')) {
      if (ref === undefined) {
        throw new Error(`${op} needs a session id or name`);
      }
      path = path.replace('{ref}', encodeURIComponent(ref));
    }
    const params = Object.entries(query ?? {}).filter(([, v]) => v !== undefined);
    if (params.length) {
      path += '?' + params.map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(String(v))}`).join('&');
    }
    return path;
  }

  /** One request; the decoded JSON answer, or an OffgridRequestError. */
  async call<T>(op: Operation, opts: { ref?: string; body?: unknown; query?: Record<string, string | number | undefined>; signal?: AbortSignal } = {}): Promise<T> {
    const response = await this.send(op, opts);
    if (response.status === 204) {
      return undefined as T;
    }
    return (await response.json()) as T;
  }

  private async send(op: Operation, opts: { ref?: string; body?: unknown; query?: Record<string, string | number | undefined>; signal?: AbortSignal }): Promise<Response> {
    const init: RequestInit = { method: ROUTES[op][0], signal: opts.signal };
    if (opts.body !== undefined) {
      init.body = JSON.stringify(opts.body);
      init.headers = { 'Content-Type': 'application/json' };
    }
    const response = await this.fetch(OffgridClient.path(op, opts.ref, opts.query), init);
    if (!response.ok) {
      throw await OffgridClient.error(response);
    }
    return response;
  }

  static async error(response: Response): Promise<OffgridRequestError> {
    let message = `${response.status} ${response.statusText}`.trim();
    let code = 'http_error';
    let type = 'HTTPError';
    try {
      const body = await response.json();
      if (body && typeof body.error === 'object' && body.error) {
        message = String(body.error.message ?? message);
        code = String(body.error.code ?? code);
        type = String(body.error.type ?? type);
      }
    } catch {
      // not JSON (a proxy's page): keep the status line
    }
    return new OffgridRequestError(message, response.status, code, type);
  }

  listSessions(limit = 200, offset = 0): Promise<SessionList> {
    return this.call('listSessions', { query: { limit, offset } });
  }
  createSession(body: Schemas['SessionCreate'] = {}): Promise<Session> {
    return this.call('createSession', { body });
  }
  getSession(ref: string): Promise<Session> {
    return this.call('getSession', { ref });
  }
  updateSession(ref: string, body: Schemas['SessionUpdate']): Promise<SessionSummary> {
    return this.call('updateSession', { ref, body });
  }
  deleteSession(ref: string): Promise<void> {
    return this.call('deleteSession', { ref });
  }
  forkSession(ref: string, body: Schemas['ForkRequest'] = {}): Promise<Session> {
    return this.call('forkSession', { ref, body });
  }
  /** Ghost text for the cursor; *signal* aborts it (the server then stops generating). */
  completeInline(request: InlineCompletionRequest, signal?: AbortSignal): Promise<InlineCompletionResponse> {
    return this.call('completeInline', { body: request, signal });
  }

  exportSession(ref: string): Promise<SessionExport> {
    return this.call('exportSession', { ref });
  }
  /** Remember that the notebook at *path* uses session *ref* (its kernel's cells continue it). */
  bindNotebook(path: string, ref: string): Promise<void> {
    return this.call('bindNotebook', { body: { path, session: ref } });
  }
  /** The session the notebook at *path* (relative to the server root) used last, or null. */
  async notebookSession(path: string): Promise<SessionSummary | null> {
    const answer = await this.call<{ session: SessionSummary | null }>('notebookSession', { query: { path } });
    return answer.session;
  }
  generationStatus(): Promise<GenerationStatus> {
    return this.call('generationStatus');
  }
  cancel(requestId: string): Promise<unknown> {
    return this.call('cancelGeneration', { body: { request_id: requestId } });
  }
  stats(): Promise<Stats> {
    return this.call('stats');
  }
  models(): Promise<any> {
    return this.call('models');
  }

  /** The per-request statistics rows, as objects. */
  async statsRequests(since?: number): Promise<RequestRow[]> {
    const table = await this.call<{ columns: string[]; data: unknown[][] }>('statsRequests', {
      query: { since }
    });
    return table.data.map(row => Object.fromEntries(table.columns.map((c, i) => [c, row[i] as any])));
  }

  /**
   * One turn on a session, streamed: its events as they arrive. Aborting `signal` (or
   * leaving the loop early) closes the stream, which cancels the turn on the server.
   */
  async *chat(ref: string, message: string, opts: ChatOptions = {}): AsyncGenerator<ChatEvent> {
    const { signal: _ignored, ...params } = opts;
    yield* this.stream('chat', ref, { message, stream: true, ...params }, opts.signal);
  }

  /**
   * A fix, an edit or new cells, streamed as a turn of the session (its reply is JSON, constrained
   * by a grammar): the `complete` event carries the parsed `proposal`. Aborting cancels it.
   */
  async *propose(ref: string, request: ProposalRequest, signal?: AbortSignal): AsyncGenerator<ChatEvent> {
    yield* this.stream('propose', ref, { ...request, stream: true }, signal);
  }

  /**
   * The turn running on a session (a notebook cell's, another client's), from its start: its
   * events, or none when nothing runs there. Following never cancels it.
   */
  async *followTurn(ref: string, signal?: AbortSignal): AsyncGenerator<ChatEvent> {
    yield* this.stream('followTurn', ref, undefined, signal);
  }

  private async *stream(op: Operation, ref: string, body: unknown, signal?: AbortSignal): AsyncGenerator<ChatEvent> {
    const controller = new AbortController();
    const abort = () => controller.abort();
    signal?.addEventListener('abort', abort);
    try {
      const response = await this.send(op, { ref, body, signal: controller.signal });
      if (response.status === 204) {
        return;
      }
      if (!response.body) {
        throw new OffgridRequestError('The server answered the stream without a body.', 502, 'server_error', 'ServerError');
      }
      for await (const sse of readEvents(response.body)) {
        let data: any = sse.data;
        try {
          data = JSON.parse(sse.data);
        } catch {
          // keep the text
        }
        yield { event: sse.event, data };
        if (sse.event === 'complete' || sse.event === 'error') {
          return;
        }
      }
    } finally {
      signal?.removeEventListener('abort', abort);
      controller.abort(); // a no-op once the stream ended; closes it when the caller left early
    }
  }
}
