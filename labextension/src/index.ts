/**
 * offgrid-jupyter's JupyterLab plugin: the sessions sidebar, the status-bar item, the
 * stats view and the cell commands, all talking to the server extension's `/offgrid/v1`
 * routes through Jupyter's own ServerConnection (its token, cookie and XSRF handling).
 */

import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { ICompletionProviderManager } from '@jupyterlab/completer';
import { URLExt } from '@jupyterlab/coreutils';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { ServerConnection } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import type { Cell, ICodeCellModel } from '@jupyterlab/cells';

import { OffgridClient } from './client';
import { OffgridInlineProvider } from './completion';
import { button, h } from './dom';
import { Attachment } from './kernelvars';
import { ProposalHost, ProposalView, Task, cellError } from './proposals';
import { panelRendererFactory } from './panel';
import { cellQuestion } from './prompts';
import { OffgridSidebar, SidebarSettings } from './sidebar';
import { OffgridStatus } from './status';

const PLUGIN_ID = 'offgrid-jupyter:plugin';

export const offgridIcon = new LabIcon({
  name: 'offgrid-jupyter:icon',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
    '<path class="jp-icon3" fill="#616161" d="M4 4h16v11H8l-4 4zM7 8v2h10V8zm0 3v2h7v-2z"/></svg>'
});

export const CommandIDs = {
  open: 'offgrid:open-chat',
  askCell: 'offgrid:ask-about-cell',
  explainError: 'offgrid:explain-error',
  fixCell: 'offgrid:fix-cell',
  editCell: 'offgrid:edit-cell',
  generateCells: 'offgrid:generate-cells'
};

/** "Edit this cell with offgrid": no JupyterLab or Notebook 7 default uses it (a test checks). */
export const EDIT_KEYS = ['Accel Alt E'];

/** The client of this page's Jupyter server. */
export function serverClient(settings = ServerConnection.makeSettings()): OffgridClient {
  return new OffgridClient(async (path, init) => {
    const url = URLExt.join(settings.baseUrl, 'offgrid/v1') + path;
    return ServerConnection.makeRequest(url, init, settings);
  });
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'offgrid-jupyter: a sessions sidebar with streaming chat, queue status and usage statistics',
  autoStart: true,
  requires: [IRenderMimeRegistry],
  optional: [ILabShell, ILayoutRestorer, INotebookTracker, ISettingRegistry, IStatusBar, ICommandPalette,
    ICompletionProviderManager],
  activate: async (
    app: JupyterFrontEnd,
    rendermime: IRenderMimeRegistry,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null,
    notebooks: INotebookTracker | null,
    settingRegistry: ISettingRegistry | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    completion: ICompletionProviderManager | null
  ) => {
    const client = serverClient();
    // ghost text as you type (JupyterLab >= 4.1; Notebook 7 too): Settings > Inline Completer > offgrid
    if (completion && typeof completion.registerInlineProvider === 'function') {
      completion.registerInlineProvider(new OffgridInlineProvider(client));
    }
    // a saved chat panel: live when its kernel still holds it, else its snapshot (see panel.ts)
    rendermime.addFactory(panelRendererFactory(notebooks), 0);
    const settings: SidebarSettings = { maxTokens: 512, temperature: 0.2, insertCodeAsCode: true };
    if (settingRegistry) {
      try {
        const loaded = await settingRegistry.load(PLUGIN_ID);
        const apply = () => {
          settings.maxTokens = loaded.get('maxTokens').composite as number;
          settings.temperature = loaded.get('temperature').composite as number;
          settings.insertCodeAsCode = loaded.get('insertCodeAsCode').composite as boolean;
        };
        apply();
        loaded.changed.connect(apply);
      } catch (err) {
        console.warn('offgrid-jupyter: settings not loaded, using defaults', err);
      }
    }

    const insert = (text: string, kind: 'code' | 'markdown'): boolean => {
      const panel = notebooks?.currentWidget;
      if (!panel) {
        return false;
      }
      const notebook = panel.content;
      NotebookActions.insertBelow(notebook);
      if (kind === 'markdown') {
        NotebookActions.changeCellType(notebook, 'markdown');
      }
      notebook.activeCell?.model.sharedModel.setSource(text);
      if (kind === 'markdown') {
        void NotebookActions.run(notebook, panel.sessionContext); // show it rendered
      }
      return true;
    };

    const open = (path: string) => void app.commands.execute('docmanager:open', { path });
    let statusItem: OffgridStatus | null = null;
    const kernel = () => notebooks?.currentWidget?.sessionContext.session?.kernel ?? null;
    const sidebar = new OffgridSidebar({
      client,
      rendermime,
      settings: () => settings,
      insert,
      storage: window.localStorage,
      open,
      kernel,
      activeCell: () => activeCellAttachment(notebooks),
      turnEnded: () => void statusItem?.poll()
    });
    sidebar.title.icon = offgridIcon;
    app.shell.add(sidebar, 'left', { rank: 600 });
    restorer?.add(sidebar, 'offgrid-sidebar');

    const openSidebar = () => {
      if (labShell) {
        labShell.activateById(sidebar.id);
      } else {
        app.shell.activateById(sidebar.id);
      }
    };

    app.commands.addCommand(CommandIDs.open, {
      label: 'Open offgrid chat',
      caption: 'Open the offgrid sessions sidebar',
      icon: offgridIcon,
      execute: openSidebar
    });

    const activeQuestion = (explain: boolean) => {
      const cell = notebooks?.activeCell;
      return cell ? cellQuestion(cell.model.toJSON() as any, explain) : null;
    };
    const ask = async (explain: boolean) => {
      const question = activeQuestion(explain);
      if (!question) {
        return;
      }
      openSidebar();
      // the cell's own notebook's conversation (the one its %%offgrid cells use), never just the open one
      await sidebar.askAbout(notebooks?.currentWidget?.context.path ?? null, question);
    };
    // the sidebar follows the active notebook: it shows that notebook's conversation
    const followActive = () => void sidebar.followNotebook(notebooks?.currentWidget?.context.path ?? null);
    notebooks?.currentChanged.connect(followActive);
    void app.restored.then(followActive);
    app.commands.addCommand(CommandIDs.askCell, {
      label: 'Ask offgrid about this cell',
      caption: "Send the active cell's source (and its error, if it failed) to the current offgrid session",
      isEnabled: () => activeQuestion(false) !== null,
      execute: () => ask(false)
    });
    app.commands.addCommand(CommandIDs.explainError, {
      label: 'Explain this error with offgrid',
      caption: "Send the failed cell and its error to offgrid and ask how to fix it",
      isEnabled: () => {
        const cell = notebooks?.activeCell;
        return !!cell && cellQuestion(cell.model.toJSON() as any, true)?.includes('It failed with') === true;
      },
      execute: () => ask(true)
    });

    // -- proposals: fix, edit, generate (proposals.ts) ------------------------------------------
    const host: ProposalHost = {
      client,
      notebookSession: path => sidebar.notebookSession(path),
      turnEnded: () => void statusItem?.poll()
    };
    const target = () => {
      const panel = notebooks?.currentWidget ?? null;
      const cell = panel?.content.activeCell ?? null;
      return panel && cell ? { panel, cell } : null;
    };
    const propose = (task: Task, panel?: NotebookPanel, cell?: Cell) => {
      const t = panel && cell ? { panel, cell } : target();
      if (!t) {
        return;
      }
      const view = new ProposalView(host, t.panel, t.cell, task);
      if (task === 'fix') {
        void view.start();
      } else {
        view.ask();
      }
    };
    app.commands.addCommand(CommandIDs.fixCell, {
      label: 'Fix this error with offgrid',
      caption: 'Propose a corrected cell as a diff to accept or reject',
      isEnabled: () => {
        const t = target();
        return !!t && cellError(t.cell) !== null;
      },
      execute: () => propose('fix')
    });
    app.commands.addCommand(CommandIDs.editCell, {
      label: 'Edit this cell with offgrid',
      caption: 'Say what to change; the proposal shows as a diff to accept or reject',
      isEnabled: () => {
        const t = target();
        return !!t && t.cell.model.sharedModel.getSource().trim() !== '';
      },
      execute: () => propose('edit')
    });
    app.commands.addCommand(CommandIDs.generateCells, {
      label: 'Generate cells with offgrid',
      caption: 'Say what the new cells should do; they are inserted below the active cell once accepted',
      isEnabled: () => target() !== null,
      execute: () => propose('generate')
    });
    app.commands.addKeyBinding({ command: CommandIDs.editCell, keys: EDIT_KEYS, selector: '.jp-Notebook' });
    // a failed cell gets a "Fix with offgrid" button under its error
    NotebookActions.executionScheduled.connect((_, { cell }) => cell.node.querySelector('.offgrid-fix-bar')?.remove());
    NotebookActions.executed.connect((_, { notebook, cell, success }) => {
      const panel = notebooks?.find(p => p.content === notebook);
      if (success || !panel || cellError(cell) === null || cell.node.querySelector('.offgrid-fix-bar')) {
        return;
      }
      const fix = button('Fix with offgrid', 'Propose a corrected cell as a diff', () => propose('fix', panel, cell),
        'offgrid-fix-button');
      const bar = h('div', { class: 'offgrid-fix-bar' }, fix);
      const outputs = cell.node.querySelector('.jp-Cell-outputWrapper');
      (outputs ?? cell.node).append(bar);
    });

    for (const command of Object.values(CommandIDs)) {
      palette?.addItem({ command, category: 'offgrid' });
    }
    app.contextMenu.addItem({ command: CommandIDs.askCell, selector: '.jp-Notebook .jp-Cell', rank: 20 });
    app.contextMenu.addItem({ command: CommandIDs.explainError, selector: '.jp-Notebook .jp-CodeCell', rank: 21 });
    app.contextMenu.addItem({ command: CommandIDs.fixCell, selector: '.jp-Notebook .jp-CodeCell', rank: 22 });
    app.contextMenu.addItem({ command: CommandIDs.editCell, selector: '.jp-Notebook .jp-Cell', rank: 23 });
    app.contextMenu.addItem({ command: CommandIDs.generateCells, selector: '.jp-Notebook .jp-Cell', rank: 24 });

    if (statusBar) {
      statusItem = new OffgridStatus(client, openSidebar);
      statusBar.registerStatusItem('offgrid-jupyter:status', { item: statusItem, align: 'left', rank: 5 });
    }
  }
};

/** The active cell as an attachment: what is selected in it, else its whole source. */
function activeCellAttachment(notebooks: INotebookTracker | null): Attachment | null {
  const cell = notebooks?.activeCell;
  if (!cell) {
    return null;
  }
  const source = cell.model.sharedModel.getSource();
  const count = cell.model.type === 'code' ? (cell.model as ICodeCellModel).executionCount : null;
  const index = notebooks?.currentWidget?.content.activeCellIndex ?? 0;
  const name = count ? `In[${count}]` : `cell ${index + 1}`;
  const editor = cell.editor;
  if (editor) {
    const sel = editor.getSelection();
    const start = editor.getOffsetAt(sel.start);
    const end = editor.getOffsetAt(sel.end);
    if (end !== start) {
      const text = source.slice(Math.min(start, end), Math.max(start, end));
      if (text.trim()) {
        return { kind: 'selection', name: `from ${name}`, type: cell.model.type, text };
      }
    }
  }
  if (!source.trim()) {
    return null;
  }
  return { kind: 'cell', name, type: cell.model.type, text: source };
}

export default plugin;
