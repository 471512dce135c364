/**
 * Inline completion (ghost text as you type) on the server's shared model: a JupyterLab
 * inline completion provider (`ICompletionProviderManager.registerInlineProvider`, JupyterLab
 * >= 4.1) named `offgrid`, enabled by default. It sends the text before and after the cursor
 * and the code cells above to `POST /offgrid/v1/completions/inline`; each new request aborts the
 * previous one (the server stops generating within one step). Tab accepts (JupyterLab's key).
 */

import type {
  CompletionHandler,
  IInlineCompletionContext,
  IInlineCompletionItem,
  IInlineCompletionList,
  IInlineCompletionProvider
} from '@jupyterlab/completer';
import type { Widget } from '@lumino/widgets';

import type { OffgridClient } from './client';

/** What this provider adds to JupyterLab's inline completer settings (Settings > Inline Completer). */
export const PROVIDER_SCHEMA = {
  properties: {
    maxTokens: {
      title: 'Max tokens',
      description: 'The longest suggestion, in tokens',
      type: 'integer',
      minimum: 1,
      maximum: 256
    }
  },
  // JupyterLab's own defaults are {enabled: true, autoFillInMiddle: false, timeout: 5000, debouncerDelay: 0}:
  // mid-line is on (brackets are closed as you type, so the cursor is mostly mid-line), a short pause
  // before asking, and room for a first request that loads the model
  default: { enabled: true, autoFillInMiddle: true, debouncerDelay: 200, timeout: 15000, maxTokens: 48 }
};

const MAX_ABOVE = 100; // cells above sent at most (the server keeps the nearest 6,000 characters)

interface CellLike {
  model: { type: string; sharedModel: { getSource(): string } };
}

/** The notebook or file being edited: its path and the code cells above the active one. */
export function surroundings(widget: Widget | null | undefined): { path?: string; above: string[] } {
  const host = widget as unknown as {
    context?: { path?: string };
    content?: { widgets?: readonly CellLike[]; activeCellIndex?: number };
  } | null;
  const path = host?.context?.path;
  const cells = host?.content?.widgets;
  const active = host?.content?.activeCellIndex ?? -1;
  if (!cells || active < 0) {
    return { path, above: [] };
  }
  const above = cells
    .slice(0, active)
    .filter(c => c.model.type === 'code')
    .map(c => c.model.sharedModel.getSource())
    .filter(s => s.trim());
  return { path, above: above.slice(-MAX_ABOVE) };
}

/** The language of a MIME type as the server names it (text/x-ipython: python). */
export function languageOf(mimeType?: string): string {
  if (!mimeType || /python/i.test(mimeType)) {
    return 'python';
  }
  return mimeType.replace(/^text\/(x-)?/, '').slice(0, 100) || 'python';
}

export class OffgridInlineProvider implements IInlineCompletionProvider {
  readonly identifier = 'offgrid';
  readonly name = 'offgrid';
  readonly schema = PROVIDER_SCHEMA as IInlineCompletionProvider['schema'];
  private maxTokens = 48;
  private pending: AbortController | null = null;

  constructor(private readonly client: OffgridClient) {}

  configure(settings: { [property: string]: unknown }): void {
    const value = settings.maxTokens;
    if (typeof value === 'number' && Number.isInteger(value) && value >= 1 && value <= 256) {
      this.maxTokens = value;
    }
  }

  async fetch(request: CompletionHandler.IRequest, context: IInlineCompletionContext): Promise<IInlineCompletionList<IInlineCompletionItem>> {
    this.pending?.abort(); // the keystroke before this one: the server stops it
    const controller = new AbortController();
    this.pending = controller;
    const prefix = request.text.slice(0, request.offset);
    if (!prefix.trim()) {
      return { items: [] }; // an empty cell: nothing to go on
    }
    const { path, above } = surroundings(context.widget);
    try {
      const answer = await this.client.completeInline(
        {
          prefix,
          suffix: request.text.slice(request.offset),
          language: languageOf(request.mimeType),
          path: path ?? null,
          context: above,
          max_tokens: this.maxTokens
        },
        controller.signal
      );
      return { items: answer.items.map(item => ({ insertText: item.insertText })) };
    } catch (err) {
      if (controller.signal.aborted) {
        return { items: [] }; // replaced by the next keystroke
      }
      return { items: [{ insertText: '', error: { message: (err as Error).message } }] };
    } finally {
      if (this.pending === controller) {
        this.pending = null;
      }
    }
  }
}
