/** Words the sidebar shows: titles without Markdown's marks, counts, names after notebooks, endings. */

import type { Message } from './client';

/** What a person sees of a title: Markdown's marks taken out (older titles kept them). */
export function plainTitle(title: string | null | undefined): string {
  return (title ?? '').replace(/`+|\*\*|__|^#+\s+/g, '').replace(/!?\[([^\]]*)\]\([^)]*\)/g, '$1');
}

export function plural(n: number, word: string): string {
  return `${n.toLocaleString()} ${word}${n === 1 ? '' : 's'}`;
}

export function basename(path: string): string {
  return path.split('/').pop() ?? path;
}

/** A session name after a notebook (as the kernel names it): `Sales analysis.ipynb` -> `Sales-analysis`. */
export function notebookStem(path: string): string {
  const stem = basename(path).replace(/\.ipynb$/, '');
  const name = stem.replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^[-._]+|[-._]+$/g, '').slice(0, 56);
  return name || 'notebook';
}

/** How a reply ended, when a reader should know: stopped, or cut by the token limit. */
export function endingNote(m: Partial<Message>): string | null {
  if (m.finish_reason === 'cancelled') {
    return '⏹ stopped: the reply ends where it was stopped';
  }
  if (m.finish_reason === 'length') {
    const limit = (m.metadata as any)?.params?.max_tokens;
    return `✂ cut at the ${limit ? `${limit}-` : ''}token limit`;
  }
  return null;
}

/** A collapsed attachment: `@df · DataFrame · 312 tokens`, `cell In[3] · error · 80 tokens`. */
export function chipLabel(a: { kind: string; name: string; type?: string | null; tokens?: number | null }): string {
  const label = a.kind === 'variable' ? `@${a.name}` : `${a.kind} ${a.name}`;
  const tokens = a.tokens ? ` · ${a.tokens.toLocaleString('en-US')} tokens` : '';
  return `${label} · ${a.type || a.kind}${tokens}`;
}

/** The context gauge: how much of the model's window the session's prompt takes, and what goes first. */
export function contextGauge(used: number, nCtx: number): string {
  const n = (x: number) => x.toLocaleString('en-US');
  return `context ${n(used)} / ${n(nCtx)} tokens (when full, the oldest turns go first)`;
}
