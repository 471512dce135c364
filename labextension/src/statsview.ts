/**
 * The sidebar's stats view: the headline figures of `GET stats` and three small charts
 * (tokens per request, decode tokens/s, queue wait) of the last requests from
 * `GET stats/requests`, refreshed every few seconds while the view is shown.
 * Charts are plain SVG: a few dozen points need no charting library.
 */

import { OffgridClient, RequestRow } from './client';
import { h } from './dom';

const REFRESH_MS = 5000;
const LAST = 50; // requests shown in the charts (of the last day's)
const SVG = 'http://www.w3.org/2000/svg';

function fmt(value: unknown, digits = 1): string {
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    return '–';
  }
  return Number.isInteger(value) ? value.toLocaleString() : value.toFixed(digits);
}

/** An SVG bar chart of *values* (nulls skipped), with its label and latest value. */
export function chart(label: string, values: (number | null)[], unit: string): HTMLElement {
  const width = 240;
  const height = 48;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('class', 'offgrid-chart-svg');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', label);
  const numbers = values.map(v => (typeof v === 'number' && Number.isFinite(v) ? v : 0));
  const top = Math.max(...numbers, 1e-9);
  const step = width / Math.max(numbers.length, 1);
  numbers.forEach((v, i) => {
    const bar = document.createElementNS(SVG, 'rect');
    const barHeight = Math.max((v / top) * (height - 2), v > 0 ? 1 : 0);
    bar.setAttribute('x', String(i * step + 0.5));
    bar.setAttribute('y', String(height - barHeight));
    bar.setAttribute('width', String(Math.max(step - 1, 1)));
    bar.setAttribute('height', String(barHeight));
    bar.setAttribute('class', 'offgrid-chart-bar');
    svg.append(bar);
  });
  const latest = [...values].reverse().find(v => typeof v === 'number');
  return h(
    'figure',
    { class: 'offgrid-chart', 'data-chart': label },
    h('figcaption', {}, `${label}: ${fmt(latest ?? null)} ${unit} (last ${values.length})`),
    svg as unknown as Node
  );
}

export class StatsView {
  readonly node = h('div', { class: 'offgrid-stats', role: 'tabpanel', 'aria-label': 'Usage statistics' });
  private timer = 0;

  constructor(private readonly client: OffgridClient) {}

  start(): void {
    if (!this.timer) {
      void this.refresh();
      this.timer = window.setInterval(() => void this.refresh(), REFRESH_MS);
    }
  }

  stop(): void {
    window.clearInterval(this.timer);
    this.timer = 0;
  }

  async refresh(): Promise<void> {
    let doc: any;
    let rows: RequestRow[];
    try {
      [doc, rows] = await Promise.all([this.client.stats(), this.client.statsRequests(Date.now() / 1000 - 86400)]);
    } catch (err) {
      this.node.replaceChildren(h('div', { class: 'offgrid-error' }, `Cannot read the statistics: ${String(err)}`));
      return;
    }
    const agg = doc.inference?.aggregate ?? {};
    const model = doc.server?.current_model ?? null;
    const m = (model && doc.inference?.models?.[model]) || {}; // the figures of the model in use
    const queue = doc.queue ?? {};
    const figures: [string, string][] = [
      ['Model', String(model ?? '–')],
      ['Requests (all models)', fmt(agg.total_requests)],
      ['Tokens (all models)', fmt(agg.total_tokens)],
      ['Completed / cancelled / failed', `${fmt(m.completed)} / ${fmt(m.cancelled)} / ${fmt(m.errors)}`],
      ['Decode tokens/s', fmt(m.tokens_per_second)],
      ['Time to first token, avg.', `${fmt(m.avg_ttft_ms, 0)} ms`],
      ['Response time, p50 / p95', `${fmt(m.p50_response_ms, 0)} / ${fmt(m.p95_response_ms, 0)} ms`],
      ['Generating now / waiting', `${queue.generating ? 'yes' : 'no'} / ${fmt(queue.queued)}`],
      ['Queue wait, avg.', `${fmt(queue.avg_queue_wait_ms, 0)} ms`],
      ['Sessions (active)', `${fmt(doc.sessions?.total_sessions)} (${fmt(doc.sessions?.active_sessions)})`]
    ];
    const last = rows.slice(-LAST);
    const num = (r: RequestRow, k: string) => (typeof r[k] === 'number' ? (r[k] as number) : null);
    this.node.replaceChildren(
      h(
        'dl',
        { class: 'offgrid-figures' },
        ...figures.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])
      ),
      chart('Tokens per request', last.map(r => (num(r, 'prompt_tokens') ?? 0) + (num(r, 'completion_tokens') ?? 0)), 'tokens'),
      chart('Decode speed', last.map(r => num(r, 'tokens_per_second')), 'tokens/s'),
      chart('Queue wait', last.map(r => num(r, 'queue_wait_ms')), 'ms')
    );
  }
}
