/** The client and the server's openapi.json cannot drift: this fails when either changes alone. */
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import openapiTS, { astToString } from 'openapi-typescript';
import { describe, expect, it } from 'vitest';

import { ROUTES } from '../src/client';

const here = dirname(fileURLToPath(import.meta.url));
const specPath = resolve(here, '../../offgrid_jupyter/server/openapi.json');
const spec = JSON.parse(readFileSync(specPath, 'utf-8'));

describe('the client against openapi.json', () => {
  it('names every operation of the document with its method and path, and nothing else', () => {
    const documented: Record<string, [string, string]> = {};
    for (const [path, ops] of Object.entries<any>(spec.paths)) {
      for (const [method, op] of Object.entries<any>(ops)) {
        if (method !== 'parameters') {
          documented[op.operationId] = [method.toUpperCase(), path];
        }
      }
    }
    expect(Object.fromEntries(Object.entries(ROUTES).map(([k, v]) => [k, [...v]]))).toEqual(documented);
  });

  it('has the types `jlpm gen:api` makes from the document now', async () => {
    const fresh = astToString(await openapiTS(new URL(`file://${specPath}`)));
    const committed = readFileSync(resolve(here, '../src/api.ts'), 'utf-8');
    const body = (text: string) => text.slice(text.indexOf('export '));
    expect(body(committed), 'src/api.ts is stale: run `jlpm gen:api` in labextension/').toBe(body(fresh));
  });
});
