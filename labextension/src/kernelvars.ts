/**
 * The active notebook's kernel, asked what variables it holds and to describe some of them
 * (for `@name` in the sidebar). Both are one silent execute request with a `user_expressions`
 * entry that calls our helper in the kernel (`offgrid_jupyter.kernel.describe`), so nothing is
 * printed in the notebook, nothing enters its history, and the descriptions are the same ones
 * `@df` in a `%%offgrid` cell makes.
 */

import type { Kernel, KernelMessage } from '@jupyterlab/services';

import type { components } from './api';

export type Attachment = components['schemas']['Attachment'];

export interface KernelVariable {
  name: string;
  type: string;
}

const HELPER = "__import__('offgrid_jupyter.kernel.describe', fromlist=['kernel_attach'])";

/** Why a kernel could not answer, in words for the sidebar. */
export class KernelAskError extends Error {}

async function evaluate(kernel: Kernel.IKernelConnection, expression: string): Promise<unknown> {
  const future = kernel.requestExecute(
    { code: '', silent: true, store_history: false, user_expressions: { offgrid: expression }, allow_stdin: false },
    true
  );
  const reply = (await future.done) as KernelMessage.IExecuteReplyMsg;
  const content = reply.content as KernelMessage.IExecuteReply & { user_expressions?: Record<string, any> };
  const result = content.user_expressions?.offgrid;
  if (!result || result.status !== 'ok') {
    const name = result?.ename ?? 'no answer';
    throw new KernelAskError(
      name === 'ModuleNotFoundError'
        ? "offgrid-jupyter is not installed in this notebook's kernel, so its variables cannot be attached."
        : `The kernel could not list its variables (${name}).`
    );
  }
  return JSON.parse(result.data?.['text/plain'] ?? 'null');
}

/** The kernel's variables (name and type), as the `@` list shows them. */
export async function listVariables(kernel: Kernel.IKernelConnection): Promise<KernelVariable[]> {
  const value = await evaluate(kernel, `${HELPER}.kernel_variables()`);
  return Array.isArray(value) ? (value as KernelVariable[]) : [];
}

/** Descriptions of the variables *names* (the chips) and of the `@name`s in *message* (found by the
 * kernel, as in a cell: not in code blocks, not an e-mail address), as attachments. */
export async function describeVariables(
  kernel: Kernel.IKernelConnection,
  names: string[],
  message: string
): Promise<Attachment[]> {
  const safe = names.filter(n => /^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$/.test(n));
  const value = await evaluate(kernel, `${HELPER}.kernel_attach(${JSON.stringify(safe)}, ${JSON.stringify(message)})`);
  return Array.isArray(value) ? (value as Attachment[]) : [];
}

/** The variables a cell's *source* reads (those the kernel holds), described, for a fix or an edit. */
export async function cellVariables(kernel: Kernel.IKernelConnection, source: string): Promise<Attachment[]> {
  const helper = "__import__('offgrid_jupyter.kernel.proposals', fromlist=['kernel_reads'])";
  const value = await evaluate(kernel, `${helper}.kernel_reads(${JSON.stringify(source)})`);
  return Array.isArray(value) ? (value as Attachment[]) : [];
}

/** The `@partial` being typed just before the cursor, if any: where it starts and what it says. */
export function mentionAt(text: string, cursor: number): { start: number; query: string } | null {
  const m = /(?:^|[^\w.@])@([A-Za-z_][\w.]*)?$/.exec(text.slice(0, cursor));
  if (!m) {
    return null;
  }
  const query = m[1] ?? '';
  return { start: cursor - query.length - 1, query };
}
