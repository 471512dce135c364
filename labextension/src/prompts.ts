/** The messages the cell commands send: a cell's source, and its error if it failed. */

interface CellJSON {
  cell_type: string;
  source: string | string[];
  outputs?: { output_type: string; ename?: string; evalue?: string }[];
}

const text = (s: string | string[]) => (Array.isArray(s) ? s.join('') : s);

/** The question about a cell (null for an empty one); *explain* asks about its error. */
export function cellQuestion(cell: CellJSON, explain: boolean): string | null {
  const source = text(cell.source).trim();
  if (!source) {
    return null;
  }
  const fence = cell.cell_type === 'code' ? '```python' : '```markdown';
  const error = (cell.outputs ?? []).find(o => o.output_type === 'error');
  let question = `Here is a cell from my notebook:\n\n${fence}\n${source}\n\`\`\`\n`;
  if (error) {
    question += `\nIt failed with:\n\n\`\`\`\n${error.ename}: ${error.evalue}\n\`\`\`\n`;
  }
  question +=
    explain && error
      ? '\nExplain this error briefly and show how to fix the cell.'
      : '\nExplain briefly what it does, and point out anything that could go wrong.';
  return question;
}
