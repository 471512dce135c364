/** Small DOM helpers shared by the sidebar's views (no framework: a view is a few elements). */

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | boolean | undefined> = {},
  ...children: (Node | string | null | undefined)[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) {
      continue;
    }
    if (k === 'class') {
      el.className = String(v);
    } else {
      el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      el.append(child);
    }
  }
  return el;
}

export function button(label: string, title: string, onClick: () => void, cls = ''): HTMLButtonElement {
  const b = h('button', { class: `offgrid-button ${cls}`.trim(), title, 'aria-label': title, type: 'button' }, label);
  b.addEventListener('click', event => {
    event.stopPropagation();
    onClick();
  });
  return b;
}

/** "12 s ago", "5 min ago", "3 h ago", else the date. */
export function ago(epochSeconds: number, now = Date.now() / 1000): string {
  const s = Math.max(0, now - epochSeconds);
  if (s < 60) {
    return `${Math.round(s)} s ago`;
  }
  if (s < 3600) {
    return `${Math.round(s / 60)} min ago`;
  }
  if (s < 86400) {
    return `${Math.round(s / 3600)} h ago`;
  }
  return new Date(epochSeconds * 1000).toISOString().slice(0, 10);
}

/** The fenced code blocks of a Markdown text, joined; null if it has none. */
export function codeBlocks(markdown: string): string | null {
  const blocks = [...markdown.matchAll(/```[^\n`]*\n([\s\S]*?)```/g)].map(m => m[1].replace(/\n$/, ''));
  return blocks.length ? blocks.join('\n\n') : null;
}
