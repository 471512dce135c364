import { describe, expect, it } from 'vitest';

import { mentionAt } from '../src/kernelvars';
import { chipLabel, contextGauge } from '../src/text';

describe('mentionAt', () => {
  it('finds the @partial being typed before the cursor', () => {
    expect(mentionAt('look at @sa', 11)).toEqual({ start: 8, query: 'sa' });
    expect(mentionAt('@', 1)).toEqual({ start: 0, query: '' });
    expect(mentionAt('look at @model.co', 17)).toEqual({ start: 8, query: 'model.co' });
  });

  it('is not an e-mail address, nor a finished word', () => {
    expect(mentionAt('mail ada@exam', 13)).toBeNull();
    expect(mentionAt('look at @sales now', 18)).toBeNull();
    expect(mentionAt('no at sign', 10)).toBeNull();
  });
});

describe('chips and the gauge', () => {
  it('names an attachment as the sidebar and the magic do', () => {
    expect(chipLabel({ kind: 'variable', name: 'df', type: 'DataFrame', tokens: 1312 })).toBe('@df · DataFrame · 1,312 tokens');
    expect(chipLabel({ kind: 'cell', name: 'In[3]', type: 'error', tokens: 80 })).toBe('cell In[3] · error · 80 tokens');
  });

  it('says how much of the window is used and what goes first', () => {
    expect(contextGauge(1840, 4096)).toBe('context 1,840 / 4,096 tokens (when full, the oldest turns go first)');
  });
});
