import { describe, expect, it } from 'vitest';

import { OffgridClient, OffgridRequestError } from '../src/client';

interface Sent {
  path: string;
  init: RequestInit;
}

function fake(answer: (sent: Sent) => Response) {
  const sent: Sent[] = [];
  const client = new OffgridClient(async (path, init) => {
    sent.push({ path, init });
    return answer({ path, init });
  });
  return { client, sent };
}

const json = (body: unknown, status = 200) =>
  new Response(JSON.stringify(body), { status, headers: { 'Content-Type': 'application/json' } });

function sse(events: [string, unknown][], signal?: AbortSignal | null, hold = false): Response {
  const encoder = new TextEncoder();
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      for (const [event, data] of events) {
        controller.enqueue(encoder.encode(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`));
      }
      if (!hold) {
        controller.close();
      }
      signal?.addEventListener('abort', () => controller.error(new DOMException('aborted', 'AbortError')));
    }
  });
  return new Response(body, { headers: { 'Content-Type': 'text/event-stream' } });
}

describe('the typed client', () => {
  it('builds paths with encoded names and query strings', async () => {
    const { client, sent } = fake(() => json({ sessions: [], total: 0 }));
    await client.listSessions(5, 10);
    await client.getSession('a b/../c').catch(() => undefined);
    expect(sent[0].path).toBe('/sessions?limit=5&offset=10');
    expect(sent[0].init.method).toBe('GET');
    expect(sent[1].path).toBe('/sessions/a%20b%2F..%2Fc');
  });

  it('sends JSON bodies with the operation method', async () => {
    const { client, sent } = fake(() => json({ id: 'session-000000000000' }));
    await client.updateSession('demo', { name: 'renamed' });
    expect(sent[0]).toMatchObject({ path: '/sessions/demo', init: { method: 'PATCH', body: '{"name":"renamed"}' } });
    expect((sent[0].init.headers as Record<string, string>)['Content-Type']).toBe('application/json');
  });

  it('turns an error answer into an OffgridRequestError with its code and status', async () => {
    const { client } = fake(() =>
      json({ error: { message: "No session 'x'.", type: 'SessionNotFoundError', code: 'session_not_found' } }, 404)
    );
    const err = await client.getSession('x').catch(e => e);
    expect(err).toBeInstanceOf(OffgridRequestError);
    expect([err.status, err.code, err.message]).toEqual([404, 'session_not_found', "No session 'x'."]);
  });

  it('keeps the status line when an error is not JSON', async () => {
    const { client } = fake(() => new Response('<html>Bad gateway</html>', { status: 502, statusText: 'Bad Gateway' }));
    const err = await client.stats().catch(e => e);
    expect([err.status, err.code, err.message]).toEqual([502, 'http_error', '502 Bad Gateway']);
  });

  it('answers 204 with nothing', async () => {
    const { client } = fake(() => new Response(null, { status: 204 }));
    expect(await client.deleteSession('x')).toBeUndefined();
  });

  it('reads the stats rows as objects', async () => {
    const { client, sent } = fake(() => json({ columns: ['request_id', 'tokens_per_second'], data: [['r1', 12.5]] }));
    expect(await client.statsRequests(100)).toEqual([{ request_id: 'r1', tokens_per_second: 12.5 }]);
    expect(sent[0].path).toBe('/stats/requests?since=100');
  });

  it('streams a chat turn as parsed events and stops after complete', async () => {
    const { client, sent } = fake(({ init }) =>
      sse([
        ['queued', { position: 1, request_id: 'r' }],
        ['start', { request_id: 'r' }],
        ['token', { delta: 'Hel' }],
        ['token', { delta: 'lo' }],
        ['complete', { response: { content: 'Hello' } }],
        ['token', { delta: 'never' }]
      ], init.signal)
    );
    const events = [];
    for await (const e of client.chat('demo', 'Hi', { max_tokens: 8 })) {
      events.push(e);
    }
    expect(events.map(e => e.event)).toEqual(['queued', 'start', 'token', 'token', 'complete']);
    expect(JSON.parse(sent[0].init.body as string)).toEqual({ message: 'Hi', stream: true, max_tokens: 8 });
  });

  it('closes the stream (cancelling the turn) when the caller aborts or leaves early', async () => {
    let seen: AbortSignal | null | undefined;
    const { client } = fake(({ init }) => {
      seen = init.signal;
      return sse([['token', { delta: 'a' }]], init.signal, true);
    });
    for await (const e of client.chat('demo', 'Hi')) {
      expect(e.event).toBe('token');
      break; // leave while the server is still sending
    }
    expect(seen?.aborted).toBe(true);

    const outer = new AbortController();
    const { client: second } = fake(({ init }) => {
      seen = init.signal;
      return sse([['start', { request_id: 'r' }]], init.signal, true);
    });
    const events: string[] = [];
    const reading = (async () => {
      for await (const e of second.chat('demo', 'Hi', { signal: outer.signal })) {
        events.push(e.event);
        outer.abort();
      }
    })();
    await expect(reading).rejects.toThrow();
    expect(events).toEqual(['start']);
    expect(seen?.aborted).toBe(true);
  });
});
