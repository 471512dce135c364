import { describe, expect, it } from 'vitest';

import { EventStreamParser, readEvents } from '../src/sse';

function streamOf(chunks: (string | Uint8Array)[]): ReadableStream<Uint8Array> {
  const encoder = new TextEncoder();
  return new ReadableStream({
    start(controller) {
      for (const c of chunks) {
        controller.enqueue(typeof c === 'string' ? encoder.encode(c) : c);
      }
      controller.close();
    }
  });
}

async function all(stream: ReadableStream<Uint8Array>) {
  const out = [];
  for await (const e of readEvents(stream)) {
    out.push(e);
  }
  return out;
}

describe('the event-stream reader', () => {
  it('hands on each event when its blank line arrives, whatever the chunking', async () => {
    const text = 'event: queued\ndata: {"position": 2}\n\nevent: token\ndata: {"delta": "h\\u00e9"}\n\n: keep-alive\n\nevent: complete\ndata: {}\n\n';
    const expected = [
      { event: 'queued', data: '{"position": 2}' },
      { event: 'token', data: '{"delta": "h\\u00e9"}' },
      { event: 'complete', data: '{}' }
    ];
    for (const size of [1, 2, 3, 7, text.length]) {
      const chunks = [];
      for (let i = 0; i < text.length; i += size) {
        chunks.push(text.slice(i, i + size));
      }
      expect(await all(streamOf(chunks))).toEqual(expected);
    }
  });

  it('joins a UTF-8 character split across chunks', async () => {
    const bytes = new TextEncoder().encode('data: é🙂\n\n');
    const events = await all(streamOf([bytes.slice(0, 7), bytes.slice(7, 9), bytes.slice(9)]));
    expect(events).toEqual([{ event: 'message', data: 'é🙂' }]);
  });

  it('accepts CRLF and CR line ends, also split between chunks, and multi-line data', () => {
    const parser = new EventStreamParser();
    const out = [
      ...parser.feed('event: token\r'),
      ...parser.feed('\ndata: a\r\ndata:b\r'),
      ...parser.feed('\r'),
      ...parser.feed('data: c\n\n')
    ];
    expect(out).toEqual([
      { event: 'token', data: 'a\nb' },
      { event: 'message', data: 'c' }
    ]);
  });

  it('drops an event the stream ended before finishing', async () => {
    expect(await all(streamOf(['event: token\ndata: {"delta": "x"}\n\nevent: complete\ndata: {']))).toEqual([
      { event: 'token', data: '{"delta": "x"}' }
    ]);
  });

  it('ignores unknown fields and an event with no data', () => {
    const parser = new EventStreamParser();
    expect(parser.feed('retry: 10\nevent: nothing\n\nid: 7\nfoo: bar\ndata\n\n')).toEqual([
      { event: 'message', data: '', id: '7' }
    ]);
  });
});
