/**
 * Fix, edit and generate cells as proposals the person accepts: the reply of a turn constrained
 * to JSON (`POST sessions/{ref}/proposals`), shown on the target cell as a diff that fills in
 * while it streams, with Accept, Accept and Run, and Reject (or Escape). Accept replaces the
 * cell's source with exactly what the diff showed, in one transaction of the cell's shared
 * model, so one undo in the cell restores it; generated cells are inserted in one transaction of
 * the notebook's, so one undo removes them all. Nothing changes in the notebook before Accept:
 * Stop, Reject, or an edit of the cell while the proposal is written (which drops it) leave the
 * cell as it was.
 */

import type { Cell, ICodeCellModel } from '@jupyterlab/cells';
import { NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import type { Kernel } from '@jupyterlab/services';

import { ChatEvent, OffgridClient, OffgridRequestError, Proposal } from './client';
import { button, h } from './dom';
import { DiffRow, diffRows, partialCells, partialString } from './diffs';
import { Attachment, cellVariables } from './kernelvars';

export type Task = 'fix' | 'edit' | 'generate';

export interface ProposalHost {
  client: OffgridClient;
  /** The session of the notebook at *path* (made and bound to it when it has none). */
  notebookSession: (path: string) => Promise<string>;
  /** A turn of ours ended (the sidebar and the status bar look again). */
  turnEnded?: () => void;
}

/** A cell's label for the model and the session: `In[3]` once it ran, else its position. */
export function cellLabel(panel: NotebookPanel, cell: Cell): string {
  const count = cell.model.type === 'code' ? (cell.model as ICodeCellModel).executionCount : null;
  return count ? `In[${count}]` : `cell ${panel.content.widgets.indexOf(cell) + 1}`;
}

/** A failed code cell's error as plain text (its traceback), or null. */
export function cellError(cell: Cell): string | null {
  if (cell.model.type !== 'code') {
    return null;
  }
  const outputs = (cell.model as ICodeCellModel).outputs;
  for (let i = 0; i < outputs.length; i++) {
    const out = outputs.get(i).toJSON() as any;
    if (out.output_type === 'error') {
      const text = (out.traceback as string[] | undefined)?.join('\n') || `${out.ename}: ${out.evalue}`;
      return text.replace(/\x1b\[[0-9;?]*[ -/]*[@-~]/g, '');
    }
  }
  return null;
}

const views = new WeakMap<Cell, ProposalView>();

/** The proposal shown on *cell*, if any. */
export function proposalOn(cell: Cell): ProposalView | undefined {
  return views.get(cell);
}

export class ProposalView {
  readonly node: HTMLElement;
  private readonly body = h('pre', { class: 'offgrid-diff-body' });
  private readonly header = h('div', { class: 'offgrid-diff-header' });
  private readonly explanation = h('div', { class: 'offgrid-diff-explanation' });
  private readonly warning = h('div', { class: 'offgrid-diff-warning' });
  private readonly actions = h('div', { class: 'offgrid-diff-actions' });
  private readonly controller = new AbortController();
  private shownCode = ''; // exactly what the diff shows: what Accept puts in the cell
  private shownCells: { cell_type: 'markdown' | 'code'; source: string }[] = [];
  private applying = false;
  private readonly original: string;
  private readonly onSourceChange = (_: unknown, change: any) => {
    if (change.sourceChange && !this.applying && ['asking', 'streaming', 'ready'].includes(this.state)) {
      this.drop('The cell changed while the proposal was written: it was dropped, and nothing was overwritten.');
    }
  };

  constructor(
    private readonly host: ProposalHost,
    private readonly panel: NotebookPanel,
    private readonly cell: Cell,
    private readonly task: Task
  ) {
    this.original = cell.model.sharedModel.getSource();
    this.node = h('div', { class: 'offgrid-diff', 'data-task': task, tabindex: '-1' }, this.header, this.body,
      this.explanation, this.warning, this.actions);
    // keys here are ours (Escape rejects); never the notebook's shortcuts
    this.node.addEventListener('keydown', event => {
      event.stopPropagation();
      if (event.key === 'Escape') {
        event.preventDefault();
        this.reject();
      }
    });
    views.get(cell)?.dispose(); // a second proposal on a cell replaces the first
    views.set(cell, this);
    cell.node.append(this.node);
    cell.model.sharedModel.changed.connect(this.onSourceChange);
    this.setState('asking');
  }

  get state(): string {
    return this.node.dataset.state ?? '';
  }

  private setState(state: 'asking' | 'streaming' | 'ready' | 'failed' | 'dropped' | 'accepted'): void {
    this.node.dataset.state = state;
    const what = { fix: 'a fix', edit: 'an edit', generate: 'new cells' }[this.task];
    const text: Record<string, string> = {
      asking: `offgrid: ${this.task === 'generate' ? 'what should the new cells do?' : 'what should change?'}`,
      streaming: `offgrid is writing ${what}…`,
      ready: `offgrid proposes ${what}`,
      failed: `offgrid could not propose ${what}`,
      dropped: `offgrid: ${what} dropped`,
      accepted: 'accepted'
    };
    this.header.textContent = text[state];
  }

  /** Edit and generate: a small prompt box on the cell for the instruction. */
  ask(): void {
    const input = h('input', {
      class: 'offgrid-diff-instruction jp-mod-styled',
      type: 'text',
      placeholder: this.task === 'generate' ? 'e.g. load sales.csv and plot revenue by month' : 'e.g. vectorise this loop',
      'aria-label': 'Instruction'
    });
    const go = () => {
      const instruction = input.value.trim();
      if (instruction) {
        input.remove();
        void this.start(instruction);
      }
    };
    input.addEventListener('keydown', event => {
      if (event.key === 'Enter') {
        event.preventDefault();
        go();
      }
    });
    this.actions.replaceChildren(button('Propose', 'Ask for the proposal (Enter)', go, 'offgrid-diff-go jp-mod-accept'),
      button('Cancel', 'Close (Escape)', () => this.reject(), 'offgrid-diff-reject'));
    this.body.before(input);
    this.body.hidden = true;
    input.focus();
  }

  /** Ask the server for the proposal and show it as it streams. */
  async start(instruction?: string): Promise<void> {
    this.setState('streaming');
    this.body.hidden = false;
    this.actions.replaceChildren(button('Stop', 'Stop writing the proposal (the cell stays as it is)',
      () => this.drop('Stopped: the cell stays as it is.'), 'offgrid-diff-stop'));
    let text = '';
    try {
      const path = this.panel.context.path;
      const ref = await this.host.notebookSession(path);
      const kernel: Kernel.IKernelConnection | null = this.panel.sessionContext.session?.kernel ?? null;
      const source = this.original;
      let context: Attachment[] = [];
      if (kernel && this.task !== 'generate' && source.trim()) {
        context = await cellVariables(kernel, source).catch(() => []); // a kernel without offgrid: none
      }
      const language = (this.panel.context.model.getMetadata('kernelspec') as any)?.language ?? 'python';
      const stream = this.host.client.propose(
        ref,
        {
          task: this.task,
          source,
          error: this.task === 'fix' ? cellError(this.cell) : null,
          instruction: instruction ?? null,
          language,
          cell_label: cellLabel(this.panel, this.cell),
          cell_id: this.cell.model.id,
          context
        },
        this.controller.signal
      );
      for await (const ev of stream as AsyncGenerator<ChatEvent>) {
        if (this.state !== 'streaming') {
          return; // dropped meanwhile
        }
        if (ev.event === 'token') {
          text += ev.data.delta;
          this.showPartial(text);
        } else if (ev.event === 'complete') {
          this.ready(ev.data.proposal as Proposal | null);
        } else if (ev.event === 'error') {
          this.fail(ev.data.message);
        }
      }
    } catch (err) {
      if (!this.controller.signal.aborted) {
        this.fail(err instanceof OffgridRequestError || err instanceof Error ? err.message : String(err));
      }
    } finally {
      this.host.turnEnded?.();
    }
  }

  private showPartial(text: string): void {
    if (this.task === 'generate') {
      this.renderCells(partialCells(text));
    } else {
      const code = partialString(text, 'code');
      if (code !== null) {
        this.renderDiff(code);
      }
    }
  }

  private renderDiff(code: string): void {
    this.shownCode = code;
    const rows = diffRows(this.original, code);
    this.body.replaceChildren(
      ...(rows.length ? rows : [{ kind: 'ctx', text: '(no change)' } as DiffRow]).map(r =>
        h('div', { class: `offgrid-diff-${r.kind}` }, r.text || ' ')
      )
    );
  }

  private renderCells(cells: { cell_type: 'markdown' | 'code'; source: string }[]): void {
    this.shownCells = cells;
    const rows: HTMLElement[] = [];
    cells.forEach((c, i) => {
      rows.push(h('div', { class: 'offgrid-diff-hunk' }, `new ${c.cell_type} cell ${i + 1}`));
      for (const line of c.source.split('\n')) {
        rows.push(h('div', { class: 'offgrid-diff-add' }, `+${line}`));
      }
    });
    this.body.replaceChildren(...rows);
  }

  private ready(proposal: Proposal | null): void {
    if (!proposal) {
      this.drop('Stopped: the cell stays as it is.');
      return;
    }
    if (this.task === 'generate') {
      this.renderCells((proposal.cells ?? []) as { cell_type: 'markdown' | 'code'; source: string }[]);
    } else {
      this.renderDiff(proposal.code ?? '');
    }
    this.setState('ready');
    this.explanation.textContent = proposal.explanation ?? '';
    this.warning.textContent = proposal.compile_error
      ? `⚠ does not compile: ${proposal.compile_error}`
      : proposal.checked
        ? ''
        : 'not checked: only Python is compiled';
    const unchanged = this.task !== 'generate' && this.shownCode.trim() === this.original.trim();
    const empty = this.task === 'generate'
      ? !(proposal.cells ?? []).some(c => c.source.trim())
      : !this.shownCode.trim();
    if (unchanged) {
      this.warning.textContent = 'No change proposed.';
    } else if (empty) {
      this.warning.textContent = '⚠ No code was proposed: the cell stays as it is.';
    }
    this.actions.replaceChildren(
      button('Accept', this.task === 'generate' ? 'Insert the cells below' : 'Replace the cell with the proposal',
        () => void this.accept(false), 'offgrid-diff-accept jp-mod-accept'),
      button('Accept and Run', 'Accept, then run', () => void this.accept(true), 'offgrid-diff-accept-run'),
      button('Reject', 'Leave the cell as it is (Escape)', () => this.reject(), 'offgrid-diff-reject')
    );
    if (unchanged || empty) {
      this.actions.querySelectorAll<HTMLButtonElement>('.offgrid-diff-accept, .offgrid-diff-accept-run')
        .forEach(b => (b.disabled = true));
    }
    this.node.focus();
  }

  private fail(message: string): void {
    this.setState('failed');
    this.warning.textContent = message;
    this.actions.replaceChildren(button('Close', 'Close', () => this.dispose(), 'offgrid-diff-reject'));
  }

  /** Stop (or the cell changed): the stream is cancelled, the cell untouched. */
  drop(message: string): void {
    this.controller.abort();
    this.setState('dropped');
    this.warning.textContent = message;
    this.actions.replaceChildren(button('Close', 'Close', () => this.dispose(), 'offgrid-diff-reject'));
  }

  async accept(run: boolean): Promise<void> {
    if (this.state !== 'ready') {
      return;
    }
    const notebook = this.panel.content;
    const index = notebook.widgets.indexOf(this.cell);
    this.setState('accepted');
    if (this.task === 'generate') {
      const model = notebook.model!;
      model.sharedModel.insertCells(index + 1, this.shownCells.map(c => ({ cell_type: c.cell_type, source: c.source })));
      this.dispose();
      if (run) {
        notebook.activeCellIndex = index + 1;
        notebook.select(notebook.widgets[index + 1]);
        for (let i = 1; i < this.shownCells.length; i++) {
          notebook.extendContiguousSelectionTo(index + 1 + i);
        }
        await NotebookActions.run(notebook, this.panel.sessionContext);
      }
      return;
    }
    this.applying = true;
    try {
      this.cell.model.sharedModel.setSource(this.shownCode); // one transaction: one undo restores it
    } finally {
      this.applying = false;
    }
    this.dispose();
    if (run) {
      notebook.activeCellIndex = index;
      notebook.deselectAll();
      await NotebookActions.run(notebook, this.panel.sessionContext);
    }
  }

  reject(): void {
    this.controller.abort();
    this.dispose();
    this.cell.activate();
  }

  dispose(): void {
    this.controller.abort();
    this.cell.model.sharedModel.changed.disconnect(this.onSourceChange);
    if (views.get(this.cell) === this) {
      views.delete(this.cell);
    }
    this.node.remove();
  }
}
