/**
 * An incremental reader of Server-Sent Events (the WHATWG "event stream" format) from a
 * fetch body: every event is handed on as soon as its blank line arrives, whatever the
 * chunking of the bytes (a UTF-8 character or a line may be split across chunks).
 * `EventSource` cannot be used: it only GETs, and our chat is a POST with a JSON body.
 */

export interface ServerSentEvent {
  event: string;
  data: string;
  id?: string;
}

/** Parses the text of an event stream, fed in arbitrary pieces. */
export class EventStreamParser {
  private buffer = '';
  private event = '';
  private data: string[] = [];
  private id: string | undefined;
  private sawCR = false;

  /** Feed a piece of text; returns the events it completed. */
  feed(text: string): ServerSentEvent[] {
    if (this.sawCR && text.startsWith('\n')) {
      text = text.slice(1); // the \n of a \r\n split across two pieces
    }
    this.sawCR = false;
    this.buffer += text;
    const out: ServerSentEvent[] = [];
    let start = 0;
    for (let i = 0; i < this.buffer.length; i++) {
      const ch = this.buffer[i];
      if (ch !== '\n' && ch !== '\r') {
        continue;
      }
      const line = this.buffer.slice(start, i);
      if (ch === '\r') {
        if (i + 1 === this.buffer.length) {
          this.sawCR = true;
        } else if (this.buffer[i + 1] === '\n') {
          i++;
        }
      }
      start = i + 1;
      const done = this.line(line);
      if (done) {
        out.push(done);
      }
    }
    this.buffer = this.buffer.slice(start);
    return out;
  }

  /** The end of the stream: an event without its blank line is dropped, as the format says. */
  end(): void {
    this.buffer = '';
    this.data = [];
    this.event = '';
  }

  private line(line: string): ServerSentEvent | null {
    if (line === '') {
      if (this.data.length === 0) {
        this.event = '';
        return null;
      }
      const done: ServerSentEvent = { event: this.event || 'message', data: this.data.join('\n') };
      if (this.id !== undefined) {
        done.id = this.id;
      }
      this.event = '';
      this.data = [];
      return done;
    }
    if (line.startsWith(':')) {
      return null; // a comment (a keep-alive)
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) {
      value = value.slice(1);
    }
    if (field === 'event') {
      this.event = value;
    } else if (field === 'data') {
      this.data.push(value);
    } else if (field === 'id' && !value.includes('\0')) {
      this.id = value;
    }
    return null;
  }
}

/** The events of a response body, one by one as they arrive. */
export async function* readEvents(body: ReadableStream<Uint8Array>): AsyncGenerator<ServerSentEvent> {
  const reader = body.getReader();
  const decoder = new TextDecoder('utf-8');
  const parser = new EventStreamParser();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        for (const event of parser.feed(decoder.decode())) {
          yield event;
        }
        parser.end();
        return;
      }
      for (const event of parser.feed(decoder.decode(value, { stream: true }))) {
        yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}
