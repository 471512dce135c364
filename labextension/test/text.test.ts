import { describe, expect, it } from 'vitest';

import { endingNote, notebookStem, plainTitle, plural } from '../src/text';

describe('what the sidebar says', () => {
  it('shows titles as plain text', () => {
    expect(plainTitle('Why does `df.groupby` fail?')).toBe('Why does df.groupby fail?');
    expect(plainTitle('## **Plot** the [sales](data/sales.csv)')).toBe('Plot the sales');
    expect(plainTitle(null)).toBe('');
  });

  it('counts in words', () => {
    expect(plural(1, 'message')).toBe('1 message');
    expect(plural(0, 'message')).toBe('0 messages');
    expect(plural(27, 'message')).toBe('27 messages');
  });

  it('names a session after its notebook as the kernel does', () => {
    expect(notebookStem('work/Sales analysis.ipynb')).toBe('Sales-analysis');
    expect(notebookStem('données/été 2026!.ipynb')).toBe('t-2026');
    expect(notebookStem('---.ipynb')).toBe('notebook');
  });

  it('says how a reply ended when it was not the usual', () => {
    expect(endingNote({ finish_reason: 'cancelled' })).toContain('stopped');
    expect(endingNote({ finish_reason: 'length', metadata: { params: { max_tokens: 64 } } } as any)).toBe(
      '✂ cut at the 64-token limit'
    );
    expect(endingNote({ finish_reason: 'stop' })).toBeNull();
  });
});
