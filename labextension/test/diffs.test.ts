import { describe, expect, it } from 'vitest';

import { diffRows, partialCells, partialString } from '../src/diffs';

describe('a proposal still being written', () => {
  it('reads a JSON string field as far as it goes, escapes included', () => {
    expect(partialString('{"code": "a = 1\\nb = \\"x', 'code')).toBe('a = 1\nb = "x');
    expect(partialString('{"code": "done", "explanation": "e"}', 'code')).toBe('done');
    expect(partialString('{"code": "half \\', 'code')).toBe('half ');
    expect(partialString('{"code": "\\u00e9t\\u00', 'code')).toBe('ét');
    expect(partialString('{"explanation": "x"', 'code')).toBeNull();
  });

  it('reads the cells of a generate proposal, the last one unfinished', () => {
    const text = '{"cells": [{"cell_type": "markdown", "source": "# Title"}, {"cell_type": "code", "source": "x = ';
    expect(partialCells(text)).toEqual([
      { cell_type: 'markdown', source: '# Title' },
      { cell_type: 'code', source: 'x = ' }
    ]);
  });
});

describe('the diff of a cell against a proposal', () => {
  it('is a unified diff without file headers', () => {
    expect(diffRows('a = 1\nb = 2', 'a = 1\nb = 3')).toEqual([
      { kind: 'hunk', text: '@@ -1,2 +1,2 @@' },
      { kind: 'ctx', text: ' a = 1' },
      { kind: 'del', text: '-b = 2' },
      { kind: 'add', text: '+b = 3' }
    ]);
    expect(diffRows('same', 'same')).toEqual([]);
  });
});
