/**
 * The text side of a proposal (no JupyterLab here, so it is unit-tested alone): the fields of a
 * JSON reply still being written, and a cell's diff against the proposal (jsdiff).
 */

import { structuredPatch } from 'diff';

export interface DiffRow {
  kind: 'add' | 'del' | 'ctx' | 'hunk';
  text: string;
}

/** The string value of *key* in a JSON object still being written, unescaped as far as it goes. */
export function partialString(text: string, key: string): string | null {
  const start = new RegExp(`"${key}"\\s*:\\s*"`).exec(text);
  if (!start) {
    return null;
  }
  let out = '';
  for (let i = start.index + start[0].length; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      return out;
    }
    if (c !== '\\') {
      out += c;
      continue;
    }
    const next = text[i + 1];
    if (next === undefined) {
      break; // half an escape: wait for the rest
    }
    if (next === 'u') {
      const hex = text.slice(i + 2, i + 6);
      if (hex.length < 4) {
        break;
      }
      out += String.fromCharCode(parseInt(hex, 16));
      i += 5;
      continue;
    }
    out += ({ n: '\n', t: '\t', r: '\r', b: '\b', f: '\f' } as Record<string, string>)[next] ?? next;
    i += 1;
  }
  return out;
}

/** The cells of a `generate` proposal still being written (the last one possibly unfinished). */
export function partialCells(text: string): { cell_type: 'markdown' | 'code'; source: string }[] {
  const cells: { cell_type: 'markdown' | 'code'; source: string }[] = [];
  const re = /"cell_type"\s*:\s*"(markdown|code)"/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(text))) {
    const source = partialString(text.slice(m.index), 'source');
    cells.push({ cell_type: m[1] as 'markdown' | 'code', source: source ?? '' });
  }
  return cells;
}

/** The lines of a unified diff of *old* against *proposed* (without its file headers). */
export function diffRows(old: string, proposed: string): DiffRow[] {
  const patch = structuredPatch('cell', 'proposed', old, proposed, '', '', { context: 3 });
  const rows: DiffRow[] = [];
  for (const hunk of patch.hunks) {
    rows.push({ kind: 'hunk', text: `@@ -${hunk.oldStart},${hunk.oldLines} +${hunk.newStart},${hunk.newLines} @@` });
    for (const line of hunk.lines) {
      if (line.startsWith('\\')) {
        continue; // "\ No newline at end of file"
      }
      rows.push({ kind: line[0] === '+' ? 'add' : line[0] === '-' ? 'del' : 'ctx', text: line });
    }
  }
  return rows;
}

