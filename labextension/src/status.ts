/**
 * The status-bar item: the model, idle / generating / N queued, and the last reply's
 * decode tokens/s. It polls `generation/status` and the newest rows of `stats/requests`
 * (only those since the last it saw), so it shows turns made anywhere on the server.
 */

import { Widget } from '@lumino/widgets';

import { GenerationStatus, OffgridClient } from './client';

const POLL_MS = 2000;

/** The item's text for a model, a generation status and the last tokens/s. */
export function statusText(model: string, status: GenerationStatus | null, tokensPerSecond: number | null): string {
  let state = 'idle';
  if (status) {
    const generating = status.generating.length;
    const queued = status.queued_session_ids?.length ?? 0;
    state = generating ? 'generating' : 'idle';
    if (queued) {
      state += ` · ${queued} queued`;
    }
  }
  const speed = tokensPerSecond === null ? '' : ` · ${tokensPerSecond.toFixed(1)} tok/s`;
  return `offgrid: ${model} · ${state}${speed}`;
}

export class OffgridStatus extends Widget {
  private timer = 0;
  private model = '…';
  private since = Date.now() / 1000 - 86400; // the last day's requests at first, then only newer ones
  private lastSpeed: number | null = null;

  constructor(
    private readonly client: OffgridClient,
    onClick: () => void
  ) {
    super();
    this.addClass('offgrid-status');
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    this.node.title = 'offgrid: open the chat sidebar';
    this.node.textContent = statusText(this.model, null, null);
    this.node.addEventListener('click', onClick);
    this.node.addEventListener('keydown', event => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        onClick();
      }
    });
  }

  protected onAfterAttach(): void {
    void this.poll();
    this.timer = window.setInterval(() => void this.poll(), POLL_MS);
  }

  protected onBeforeDetach(): void {
    window.clearInterval(this.timer);
  }

  async poll(): Promise<void> {
    try {
      if (this.model === '…') {
        const models = await this.client.models();
        this.model = models?.current?.name ?? models?.data?.[0]?.id ?? 'no model';
      }
      const [status, rows] = await Promise.all([this.client.generationStatus(), this.client.statsRequests(this.since)]);
      for (const row of rows) {
        if (typeof row.started_at === 'number') {
          this.since = Math.max(this.since, row.started_at + 1e-6);
        }
        if (typeof row.tokens_per_second === 'number' && row.tokens_per_second > 0) {
          this.lastSpeed = row.tokens_per_second;
        }
      }
      this.node.textContent = statusText(this.model, status, this.lastSpeed);
      this.node.classList.toggle('offgrid-mod-busy', this.node.textContent.includes('generating'));
    } catch {
      this.node.textContent = 'offgrid: server unreachable';
    }
  }
}
