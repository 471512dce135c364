/**
 * The left-sidebar panel: sessions (newest first, searchable, with new / rename / fork /
 * delete / export), one session's conversation with a streaming message box, and the
 * stats view. Everything lives on the server, so a page reload or a kernel restart loses
 * nothing; the panel polls so that turns made elsewhere (magics, the ipywidgets panel,
 * REST, another tab) appear without a reload.
 */

import { Clipboard, Dialog, InputDialog, showDialog } from '@jupyterlab/apputils';
import { IRenderMimeRegistry, MimeModel } from '@jupyterlab/rendermime';
import type { Kernel } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

import { ChatEvent, Message, OffgridClient, OffgridRequestError, Session, SessionSummary } from './client';
import { ago, button, codeBlocks, h } from './dom';
import { Attachment, KernelVariable, describeVariables, listVariables, mentionAt } from './kernelvars';
import { basename, chipLabel, contextGauge, endingNote, notebookStem, plainTitle, plural } from './text';
import { StatsView } from './statsview';

export interface SidebarSettings {
  maxTokens: number;
  temperature: number;
  insertCodeAsCode: boolean;
}

export interface SidebarOptions {
  client: OffgridClient;
  rendermime: IRenderMimeRegistry;
  settings: () => SidebarSettings;
  /** Insert text below the active notebook cell; false when no notebook is open. */
  insert: (text: string, kind: 'code' | 'markdown') => boolean;
  /** Where the open session is remembered across page reloads. */
  storage?: Storage;
  /** Open a file (a reply's source) in JupyterLab. */
  open?: (path: string) => void;
  /** The active notebook's kernel, whose variables `@name` attaches (null: none running). */
  kernel?: () => Kernel.IKernelConnection | null;
  /** The active cell, or its selection when there is one, as an attachment (null: no cell). */
  activeCell?: () => Attachment | null;
  /** A turn of ours ended (the status bar looks again at once instead of at its next poll). */
  turnEnded?: () => void;
}

const POLL_MS = 2000;
const VARIABLES_MS = 3000; // how long the kernel's variable list is reused while typing
const STORAGE_KEY = 'offgrid-jupyter:sidebar';

export class OffgridSidebar extends Widget {
  private readonly client: OffgridClient;
  private readonly opts: SidebarOptions;
  private sessions: SessionSummary[] = [];
  private signature = '';
  private current: Session | null = null;
  private streaming: AbortController | null = null;
  private following: AbortController | null = null; // another turn of the open session, shown as it streams
  private requestId: string | null = null;
  private notebook: string | null = null; // the active notebook's path (relative to the server root)
  private view: 'chats' | 'stats' = 'chats';
  private timer = 0;
  private listFailed = false;
  private readonly stats: StatsView;

  private readonly listView = h('div', { class: 'offgrid-list-view' });
  private readonly search = h('input', {
    class: 'offgrid-search jp-mod-styled',
    type: 'search',
    placeholder: 'Search sessions',
    'aria-label': 'Search sessions'
  });
  private readonly list = h('ul', { class: 'offgrid-sessions', role: 'list' });
  private readonly chatView = h('div', { class: 'offgrid-chat-view', hidden: true });
  private readonly chatTitle = h('span', { class: 'offgrid-chat-title' });
  private readonly chatSubtitle = h('div', { class: 'offgrid-chat-subtitle' });
  private readonly notebookHint = h('div', { class: 'offgrid-notebook-hint', hidden: true });
  private readonly modelHint = h('div', { class: 'offgrid-model-hint', hidden: true });
  private readonly messages = h('div', { class: 'offgrid-messages', role: 'log', 'aria-live': 'polite' });
  private readonly state = h('div', { class: 'offgrid-state', role: 'status' });
  private readonly box = h('textarea', {
    class: 'offgrid-input jp-mod-styled',
    rows: '3',
    placeholder: 'Ask offgrid… (Enter sends, Shift+Enter is a new line, @ attaches a variable)',
    'aria-label': 'Message'
  });
  private readonly chips = h('div', { class: 'offgrid-chips' });
  private readonly mentionList = h('ul', { class: 'offgrid-mention-list', role: 'listbox', hidden: true });
  private readonly cellToggle = button(
    '+ Cell',
    'Attach the active cell (or what is selected in it) to the next message',
    () => this.toggleCell(),
    'offgrid-attach-cell'
  );
  private readonly gauge = h('div', { class: 'offgrid-gauge' });
  private attached: string[] = []; // the variables chosen from the @ list (their chips)
  private attachCell = false;
  private variables: { at: number; kernel: Kernel.IKernelConnection | null; list: KernelVariable[] } | null = null;
  private mention: { start: number; query: string; shown: KernelVariable[]; active: number } | null = null;
  private nCtx: number | null = null;
  private readonly send = button('Send', 'Send the message (Enter)', () => void this.submit(), 'offgrid-send jp-mod-accept');
  private readonly stop = button('Stop', 'Stop the reply (keeps what was said)', () => this.stopReply(), 'offgrid-stop');
  private readonly error = h('div', { class: 'offgrid-error', role: 'alert' });
  private readonly tabs = {
    chats: button('Chats', 'Sessions and chat', () => this.showView('chats'), 'offgrid-tab'),
    stats: button('Stats', 'Usage statistics', () => this.showView('stats'), 'offgrid-tab')
  };

  constructor(opts: SidebarOptions) {
    super();
    this.opts = opts;
    this.client = opts.client;
    this.id = 'offgrid-sidebar';
    this.addClass('offgrid-sidebar');
    this.title.caption = 'offgrid: local LLM chat';
    this.stats = new StatsView(this.client);
    this.stop.disabled = true;

    const newButton = button('+ New', 'New session', () => void this.newSession(), 'offgrid-new');
    this.listView.append(h('div', { class: 'offgrid-toolbar' }, this.search, newButton), this.notebookHint, this.list);
    const back = button('←', 'Back to the sessions', () => this.close_(), 'offgrid-back');
    this.chatView.append(
      h('div', { class: 'offgrid-toolbar' }, back, this.chatTitle),
      this.chatSubtitle,
      this.messages,
      this.gauge,
      this.state,
      h(
        'div',
        { class: 'offgrid-compose' },
        this.mentionList,
        this.chips,
        this.box,
        h('div', { class: 'offgrid-compose-buttons' }, this.send, this.stop, this.cellToggle)
      )
    );
    this.node.append(
      h('div', { class: 'offgrid-tabs', role: 'tablist' }, this.tabs.chats, this.tabs.stats),
      this.modelHint,
      this.error,
      this.listView,
      this.chatView,
      this.stats.node
    );
    this.stats.node.hidden = true;
    this.tabs.chats.classList.add('offgrid-mod-active');

    this.search.addEventListener('input', () => this.renderList());
    this.box.addEventListener('input', () => void this.updateMentions());
    this.box.addEventListener('blur', () => window.setTimeout(() => this.closeMentions(), 150));
    this.box.addEventListener('keydown', event => {
      if (this.mention && this.mentionKey(event)) {
        return;
      }
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        void this.submit();
      }
    });
    // Keys typed here are ours: never JupyterLab's notebook shortcuts (which listen on the document).
    for (const kind of ['keydown', 'keypress', 'keyup'] as const) {
      this.node.addEventListener(kind, event => event.stopPropagation());
    }
  }

  /** The open session (null on the list). */
  get session(): Session | null {
    return this.current;
  }

  protected onAfterAttach(): void {
    void this.restore();
    this.timer = window.setInterval(() => void this.poll(), POLL_MS);
  }

  protected onAfterShow(): void {
    // JupyterLab's side area is 250 px wide by default, too narrow for a reply's code: our min-width
    // (360 px, CSS) takes effect when the area fits its shown widget again
    this.parent?.fit();
  }

  protected onBeforeDetach(): void {
    window.clearInterval(this.timer);
    this.stats.stop();
  }

  private async restore(): Promise<void> {
    void this.showModelHint();
    await this.refresh();
    if (this.current) {
      return; // a notebook became active meanwhile and opened its conversation
    }
    const saved = this.opts.storage?.getItem(STORAGE_KEY);
    if (saved) {
      try {
        const { session, view } = JSON.parse(saved);
        if (session && this.sessions.some(s => s.id === session)) {
          await this.open(session);
        }
        if (view === 'stats') {
          this.showView('stats');
        }
      } catch {
        this.opts.storage?.removeItem(STORAGE_KEY);
      }
    }
  }

  /** Say when the tiny embedded default answers: it shows the plumbing, not what a model can do. */
  private async showModelHint(): Promise<void> {
    try {
      const models = await this.client.models();
      if (models?.current?.source === 'default') {
        this.modelHint.textContent =
          `The embedded default model (${models.current.name}) is in use: small enough to show how everything ` +
          "works, too small for good answers. The README's “Choosing a model” says which GGUF to use instead.";
        this.modelHint.hidden = false;
      }
    } catch {
      // the status item says when the server cannot be reached
    }
  }

  private remember(): void {
    this.opts.storage?.setItem(STORAGE_KEY, JSON.stringify({ session: this.current?.id ?? null, view: this.view }));
  }

  showView(view: 'chats' | 'stats'): void {
    this.view = view;
    this.tabs.chats.classList.toggle('offgrid-mod-active', view === 'chats');
    this.tabs.stats.classList.toggle('offgrid-mod-active', view === 'stats');
    this.listView.hidden = view !== 'chats' || this.current !== null;
    this.chatView.hidden = view !== 'chats' || this.current === null;
    this.stats.node.hidden = view !== 'stats';
    if (view === 'stats') {
      this.stats.start();
    } else {
      this.stats.stop();
    }
    this.remember();
  }

  private fail(err: unknown): void {
    if (err === null) {
      this.error.textContent = ''; // a new action: the last one's error is stale
      return;
    }
    const text = err instanceof OffgridRequestError ? err.message : `Something went wrong: ${String(err)}`;
    this.error.textContent = text;
  }

  // -- the sessions -------------------------------------------------------------------------------
  async refresh(): Promise<void> {
    try {
      const listed = await this.client.listSessions();
      this.sessions = listed.sessions;
      if (this.listFailed) {
        this.error.textContent = ''; // the server is back; other errors stay until the next action
        this.listFailed = false;
      }
      const signature = JSON.stringify(this.sessions.map(s => [s.id, s.name, s.title, s.message_count, s.updated_at]));
      if (signature !== this.signature) {
        this.signature = signature;
        this.renderList();
      }
    } catch (err) {
      this.fail(err);
      this.listFailed = true;
    }
  }

  private async poll(): Promise<void> {
    if (!this.isVisible) {
      return;
    }
    await this.refresh();
    if (!this.current && this.notebook && !this.notebookHint.hidden) {
      // the active notebook had no conversation: its first cell may have started one since
      const path = this.notebook;
      const session = await this.client.notebookSession(path).catch(() => null);
      if (session && path === this.notebook && !this.current) {
        await this.open(session.id, { notebook: path });
      }
      return;
    }
    const open = this.current;
    if (open && !this.streaming && !this.following) {
      const summary = this.sessions.find(s => s.id === open.id);
      if (!summary) {
        this.close_(); // deleted elsewhere
        return;
      }
      try {
        const status = await this.client.generationStatus();
        if ((status.generating ?? []).some(g => g.session_id === open.id)) {
          void this.follow(open.id); // a cell (or another client) is writing in this conversation: show it
          return;
        }
      } catch {
        // the list's own refresh says when the server is gone
      }
      if (summary.message_count !== open.messages.length || summary.name !== open.name) {
        await this.open(open.id, { scroll: 'keep' });
      }
    }
  }

  /** A session's name if it has one (what magics and REST call it), else its title (its first question). */
  private label(s: SessionSummary): string {
    return s.name || plainTitle(s.title) || s.id;
  }

  private renderList(): void {
    const needle = this.search.value.trim().toLowerCase();
    const shown = this.sessions.filter(
      s => !needle || [s.name, s.title, s.id].some(v => (v ?? '').toLowerCase().includes(needle))
    );
    this.list.replaceChildren(
      ...shown.map(s => {
        const open = h(
          'button',
          { class: 'offgrid-session-open', type: 'button', title: `Open ${this.label(s)}` },
          h('span', { class: 'offgrid-session-title' }, this.label(s)),
          s.name && s.title ? h('span', { class: 'offgrid-session-subtitle' }, plainTitle(s.title)) : null,
          h('span', { class: 'offgrid-session-meta' }, `${plural(s.message_count, 'message')} · ${ago(s.updated_at)}`)
        );
        open.addEventListener('click', () => void this.open(s.id));
        return h(
          'li',
          { class: 'offgrid-session', 'data-session-id': s.id, 'data-session-name': s.name ?? '' },
          open,
          h(
            'span',
            { class: 'offgrid-session-actions' },
            button('Rename', `Rename ${this.label(s)}`, () => void this.rename(s), 'offgrid-rename'),
            button('Fork', `Fork ${this.label(s)}`, () => void this.fork(s), 'offgrid-fork'),
            button('Export', `Export ${this.label(s)} as JSON`, () => void this.exportSession(s), 'offgrid-export'),
            button('Delete', `Delete ${this.label(s)}`, () => void this.remove(s), 'offgrid-delete jp-mod-warn')
          )
        );
      })
    );
    if (!shown.length) {
      this.list.append(h('li', { class: 'offgrid-empty' }, needle ? 'No session matches.' : 'No sessions yet: start one with + New.'));
    }
  }

  private async ask(title: string, label: string, text = ''): Promise<string | null> {
    const result = await InputDialog.getText({ title, label, text });
    return result.button.accept ? (result.value ?? '').trim() : null;
  }

  async newSession(): Promise<void> {
    this.fail(null);
    const name = await this.ask('New offgrid session', 'Name (optional: letters, digits, . _ -)');
    if (name === null) {
      return;
    }
    try {
      const session = await this.client.createSession(name ? { name } : {});
      await this.refresh();
      await this.open(session.id);
    } catch (err) {
      this.fail(err);
    }
  }

  private async rename(s: SessionSummary): Promise<void> {
    this.fail(null);
    const name = await this.ask(`Rename ${this.label(s)}`, 'New name', s.name ?? '');
    if (!name) {
      return;
    }
    try {
      await this.client.updateSession(s.id, { name });
      await this.refresh();
      if (this.current?.id === s.id) {
        await this.open(s.id);
      }
    } catch (err) {
      this.fail(err);
    }
  }

  private async fork(s: SessionSummary): Promise<void> {
    this.fail(null);
    try {
      const copy = await this.client.forkSession(s.id);
      await this.refresh();
      await this.open(copy.id);
    } catch (err) {
      this.fail(err);
    }
  }

  private async remove(s: SessionSummary): Promise<void> {
    this.fail(null);
    const answer = await showDialog({
      title: `Delete ${this.label(s)}?`,
      body: `Its ${plural(s.message_count, 'message')} ${s.message_count === 1 ? 'is' : 'are'} deleted for every notebook and kernel.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await this.client.deleteSession(s.id);
      if (this.current?.id === s.id) {
        this.close_();
      }
      await this.refresh();
    } catch (err) {
      this.fail(err);
    }
  }

  private async exportSession(s: SessionSummary): Promise<void> {
    this.fail(null);
    try {
      const doc = await this.client.exportSession(s.id);
      const url = URL.createObjectURL(new Blob([JSON.stringify(doc, null, 1)], { type: 'application/json' }));
      const link = h('a', { href: url, download: `${s.name || s.id}.json` });
      document.body.append(link);
      link.click();
      link.remove();
      URL.revokeObjectURL(url);
    } catch (err) {
      this.fail(err);
    }
  }

  // -- one conversation ---------------------------------------------------------------------------
  /**
   * Show session *ref*. It opens at the newest message (once every reply's Markdown is rendered:
   * scrolling before that lands short); ``scroll: 'keep'`` (a refresh of the open conversation)
   * keeps the reader where they were, or at the bottom if they were there.
   */
  async open(ref: string, opts: { scroll?: 'bottom' | 'keep'; notebook?: string | null } = {}): Promise<void> {
    const wasAtBottom = this.nearBottom();
    const scrolled = this.messages.scrollTop;
    let session: Session;
    try {
      session = await this.client.getSession(ref);
    } catch (err) {
      this.fail(err);
      return;
    }
    const same = this.current?.id === session.id;
    this.current = session;
    if (opts.notebook !== undefined) {
      this.chatSubtitle.textContent = opts.notebook ? `${basename(opts.notebook)}'s conversation` : '';
    } else if (!same) {
      this.chatSubtitle.textContent = '';
    }
    this.chatTitle.textContent = this.label(session);
    this.chatView.dataset.sessionId = session.id;
    const rendered: Promise<void>[] = [];
    this.messages.replaceChildren(
      ...session.messages
        .filter(m => m.role !== 'system')
        .map(m => {
          if (m.role === 'tool') {
            return toolLine(m);
          }
          const { el, done } = this.bubble(m);
          rendered.push(done);
          return el;
        })
    );
    this.showView('chats');
    void this.showGauge(session);
    await Promise.all(rendered);
    if (opts.scroll === 'keep' && same && !wasAtBottom) {
      this.messages.scrollTop = scrolled;
    } else {
      this.scrollToEnd();
    }
  }

  private nearBottom(): boolean {
    const m = this.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 40;
  }

  private scrollToEnd(): void {
    this.messages.scrollTop = this.messages.scrollHeight;
  }

  /** Show the active notebook's conversation (the one its cells use), or offer to start it. */
  async followNotebook(path: string | null): Promise<void> {
    if (path === this.notebook) {
      return;
    }
    this.notebook = path;
    if (!path || this.streaming) {
      return;
    }
    let session: SessionSummary | null = null;
    try {
      session = await this.client.notebookSession(path);
    } catch (err) {
      this.fail(err);
      return;
    }
    if (path !== this.notebook) {
      return; // another notebook became active meanwhile
    }
    if (session) {
      await this.open(session.id, { notebook: path });
    } else {
      this.close_();
      this.showNotebookHint(path);
    }
  }

  private showNotebookHint(path: string): void {
    const start = button('Start it', `Start ${basename(path)}'s conversation`, () => void this.startForNotebook(path),
      'offgrid-start-notebook');
    this.notebookHint.replaceChildren(
      h('span', {}, `${basename(path)} has no conversation yet: its first %%offgrid cell, or a message here, starts one. `),
      start
    );
    this.notebookHint.hidden = false;
  }

  /** The session of the notebook at *path*: the one its cells use, else a new one bound to it. */
  async notebookSession(path: string): Promise<string> {
    const found = await this.client.notebookSession(path);
    if (found) {
      return found.id;
    }
    const stem = notebookStem(path);
    let session: Session | null = null;
    for (const name of [stem, `${stem}-2`, `${stem}-3`, undefined]) {
      try {
        const metadata = { notebook: path } as unknown as Record<string, never>; // (any JSON object: see openapi.json)
        session = await this.client.createSession(name ? { name, metadata } : { metadata });
        break;
      } catch (err) {
        if (!(err instanceof OffgridRequestError) || err.status !== 409) {
          throw err;
        }
      }
    }
    await this.client.bindNotebook(path, session!.id); // its kernel's cells continue this conversation
    return session!.id;
  }

  private async startForNotebook(path: string): Promise<void> {
    this.fail(null);
    try {
      const id = await this.notebookSession(path);
      await this.refresh();
      await this.open(id, { notebook: path });
      this.box.focus();
    } catch (err) {
      this.fail(err);
    }
  }

  private close_(): void {
    this.stopReply(); // going back to the list stops a running reply (it keeps what was said)
    this.following?.abort();
    this.current = null;
    this.notebookHint.hidden = true;
    this.showView('chats');
  }

  /** A message: a person's text as text (line breaks kept, nothing read as HTML or Markdown), a
   * reply as Markdown with its sources, its actions and how it ended when that is not the usual. */
  private bubble(m: Pick<Message, 'role' | 'content'> & Partial<Message>, streaming = false): { el: HTMLElement; done: Promise<void> } {
    const body = h('div', { class: 'offgrid-bubble-body' });
    const el = h('div', { class: `offgrid-bubble offgrid-${m.role}`, 'data-role': m.role, 'data-message-id': m.id }, body);
    let done = Promise.resolve();
    if (streaming || m.role !== 'assistant') {
      body.textContent = m.content;
      const attached = ((m as any).metadata?.context ?? []) as Attachment[];
      if (m.role === 'user' && attached.length) {
        el.append(
          h(
            'div',
            { class: 'offgrid-attachments' },
            ...attached.map(a =>
              h(
                'details',
                { class: 'offgrid-attachment', 'data-kind': a.kind, 'data-name': a.name },
                h('summary', {}, chipLabel(a)),
                h('pre', {}, a.text)
              )
            )
          )
        );
      }
    } else {
      done = this.renderMarkdown(body, m.content);
      const sources = ((m as any).metadata?.sources ?? []) as { path: string; start: number; end: number; unit?: string }[];
      if (sources.length) {
        el.append(this.sources(sources));
      }
      const ending = endingNote(m);
      if (ending) {
        el.dataset.finish = m.finish_reason ?? '';
        el.append(h('div', { class: 'offgrid-bubble-note' }, ending));
      }
      el.append(this.actions(m.content));
    }
    return { el, done };
  }

  /** A reply's sources (retrieval): each opens its file. */
  private sources(sources: { path: string; start: number; end: number; unit?: string }[]): HTMLElement {
    const list = h('div', { class: 'offgrid-sources' }, 'Sources: ');
    sources.forEach((s, i) => {
      const span = s.start === s.end ? `${s.start}` : `${s.start}-${s.end}`;
      const where = s.unit === 'cell' ? 'cell' : s.unit === 'page' ? 'page' : 'lines';
      const link = h('a', { href: '#', class: 'offgrid-source', title: `Open ${s.path}` }, `[${i + 1}] ${s.path} ${where} ${span}`);
      link.addEventListener('click', event => {
        event.preventDefault();
        this.opts.open?.(s.path);
      });
      list.append(link, ' ');
    });
    return list;
  }

  private renderMarkdown(into: HTMLElement, text: string): Promise<void> {
    const renderer = this.opts.rendermime.createRenderer('text/markdown');
    into.replaceChildren(renderer.node);
    return renderer.renderModel(new MimeModel({ data: { 'text/markdown': text }, trusted: false })).catch(() => undefined);
  }

  private actions(text: string): HTMLElement {
    const copy = button('Copy', 'Copy the reply', () => Clipboard.copyToSystem(text), 'offgrid-copy');
    const insert = button(
      'Insert',
      'Insert into the notebook below the active cell',
      () => {
        const code = codeBlocks(text);
        const asCode = this.opts.settings().insertCodeAsCode && code !== null;
        if (!this.opts.insert(asCode ? code! : text, asCode ? 'code' : 'markdown')) {
          this.error.textContent = 'Open a notebook to insert the reply into it.';
        }
      },
      'offgrid-insert'
    );
    return h('div', { class: 'offgrid-bubble-actions' }, copy, insert);
  }

  // -- attachments: @variables of the active notebook's kernel, the active cell -----------------
  /** The `@partial` before the cursor opens the list of the kernel's variables, filtered as typed. */
  private async updateMentions(): Promise<void> {
    const at = mentionAt(this.box.value, this.box.selectionStart ?? this.box.value.length);
    if (!at) {
      this.closeMentions();
      return;
    }
    const kernel = this.opts.kernel?.() ?? null;
    if (!kernel) {
      this.mention = { ...at, shown: [], active: 0 };
      this.showMentionNote('No kernel: open a notebook whose kernel runs to attach its variables.');
      return;
    }
    let list: KernelVariable[];
    try {
      list = await this.kernelVariables(kernel);
    } catch (err) {
      this.mention = { ...at, shown: [], active: 0 };
      this.showMentionNote(err instanceof Error ? err.message : String(err));
      return;
    }
    const again = mentionAt(this.box.value, this.box.selectionStart ?? this.box.value.length);
    if (!again || again.start !== at.start) {
      return; // typed on meanwhile: the newer input event shows its own list
    }
    const q = again.query.toLowerCase();
    const shown = [
      ...list.filter(v => v.name.toLowerCase().startsWith(q)),
      ...list.filter(v => !v.name.toLowerCase().startsWith(q) && v.name.toLowerCase().includes(q))
    ].slice(0, 50);
    this.mention = { ...again, shown, active: 0 };
    if (!shown.length) {
      this.showMentionNote(list.length ? `No variable matches “${again.query}”.` : 'The kernel has no variables yet.');
      return;
    }
    this.renderMentions();
  }

  private async kernelVariables(kernel: Kernel.IKernelConnection): Promise<KernelVariable[]> {
    const cached = this.variables;
    if (cached && cached.kernel === kernel && Date.now() - cached.at < VARIABLES_MS) {
      return cached.list;
    }
    const list = await listVariables(kernel);
    this.variables = { at: Date.now(), kernel, list };
    return list;
  }

  private renderMentions(): void {
    const m = this.mention!;
    this.mentionList.replaceChildren(
      ...m.shown.map((v, i) => {
        const item = h(
          'li',
          { class: `offgrid-mention${i === m.active ? ' offgrid-mod-active' : ''}`, role: 'option', 'data-name': v.name },
          h('span', { class: 'offgrid-mention-name' }, v.name),
          h('span', { class: 'offgrid-mention-type' }, v.type)
        );
        item.addEventListener('mousedown', event => {
          event.preventDefault(); // keep the focus in the box
          this.choose(v);
        });
        return item;
      })
    );
    this.mentionList.hidden = false;
  }

  private showMentionNote(text: string): void {
    this.mentionList.replaceChildren(h('li', { class: 'offgrid-mention-note' }, text));
    this.mentionList.hidden = false;
  }

  private closeMentions(): void {
    this.mention = null;
    this.mentionList.hidden = true;
    this.mentionList.replaceChildren();
  }

  /** Keys while the list is open: arrows move, Enter or Tab chooses, Escape closes. */
  private mentionKey(event: KeyboardEvent): boolean {
    const m = this.mention!;
    if (event.key === 'Escape') {
      event.preventDefault();
      this.closeMentions();
      return true;
    }
    if (!m.shown.length) {
      return false;
    }
    if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
      event.preventDefault();
      m.active = (m.active + (event.key === 'ArrowDown' ? 1 : m.shown.length - 1)) % m.shown.length;
      this.renderMentions();
      return true;
    }
    if ((event.key === 'Enter' && !event.shiftKey) || event.key === 'Tab') {
      event.preventDefault();
      this.choose(m.shown[m.active]);
      return true;
    }
    return false;
  }

  /** `@partial` becomes `@name `, and the variable a chip (its description is taken when sending). */
  private choose(v: KernelVariable): void {
    const m = this.mention;
    if (!m) {
      return;
    }
    const cursor = this.box.selectionStart ?? this.box.value.length;
    this.box.value = `${this.box.value.slice(0, m.start)}@${v.name} ${this.box.value.slice(cursor)}`;
    const at = m.start + v.name.length + 2;
    this.box.setSelectionRange(at, at);
    if (!this.attached.includes(v.name)) {
      this.attached.push(v.name);
    }
    this.closeMentions();
    this.renderChips();
    this.box.focus();
  }

  private toggleCell(): void {
    this.attachCell = !this.attachCell;
    this.renderChips();
  }

  private renderChips(): void {
    this.cellToggle.classList.toggle('offgrid-mod-active', this.attachCell);
    this.cellToggle.setAttribute('aria-pressed', String(this.attachCell));
    const chips: HTMLElement[] = this.attached.map(name =>
      this.chip(`@${name}`, `Do not attach ${name}`, () => {
        this.attached = this.attached.filter(n => n !== name);
        this.renderChips();
      })
    );
    if (this.attachCell) {
      chips.push(this.chip('the active cell', 'Do not attach the active cell', () => this.toggleCell()));
    }
    this.chips.replaceChildren(...chips);
  }

  private chip(text: string, removeTitle: string, remove: () => void): HTMLElement {
    return h(
      'span',
      { class: 'offgrid-chip', 'data-chip': text },
      text,
      button('×', removeTitle, remove, 'offgrid-chip-remove')
    );
  }

  /** What the message attaches, described now: the chips' variables and the message's other
   * `@name`s (by the kernel), and the active cell or its selection when asked for. */
  private async attachments(message: string): Promise<Attachment[]> {
    const out: Attachment[] = [];
    const kernel = this.opts.kernel?.() ?? null;
    if (kernel && (this.attached.length || message.includes('@'))) {
      out.push(...(await describeVariables(kernel, this.attached, message)));
    } else if (this.attached.length) {
      throw new Error('The notebook whose variables were chosen has no running kernel: they cannot be described.');
    }
    if (this.attachCell) {
      const cell = this.opts.activeCell?.();
      if (!cell) {
        throw new Error('No active cell to attach: click a cell of a notebook first.');
      }
      out.push(cell);
    }
    return out;
  }

  /** The context gauge: how much of the model's window the session's prompt took at its last turn. */
  private async showGauge(session: Session): Promise<void> {
    const last = [...session.messages].reverse().find(m => m.role === 'assistant' && (m as any).usage);
    if (!last) {
      this.gauge.textContent = '';
      return;
    }
    if (this.nCtx === null) {
      try {
        this.nCtx = (await this.client.models())?.current?.n_ctx ?? null;
      } catch {
        return;
      }
    }
    const usage = (last as any).usage as { prompt_tokens?: number; completion_tokens?: number };
    const used = (usage.prompt_tokens ?? 0) + (usage.completion_tokens ?? 0);
    this.gauge.textContent = this.nCtx ? contextGauge(used, this.nCtx) : '';
  }

  /** Send the message box's text (or *text*) as a turn of the open session. */
  async submit(text?: string): Promise<void> {
    const message = (text ?? this.box.value).trim();
    if (!message || this.streaming || !this.current) {
      return;
    }
    const session = this.current;
    const controller = new AbortController();
    this.streaming = controller;
    let context: Attachment[] = [];
    if (text === undefined) {
      try {
        this.state.textContent = this.attached.length || message.includes('@') ? 'Describing the attachments…' : '';
        context = await this.attachments(message);
      } catch (err) {
        this.streaming = null;
        this.state.textContent = '';
        this.fail(err);
        return; // the message and its chips stay, to fix and send again
      }
      this.box.value = '';
      this.attached = [];
      this.attachCell = false;
      this.renderChips();
    }
    this.send.disabled = true;
    this.stop.disabled = false;
    this.error.textContent = '';
    const question = this.bubble({ role: 'user', content: message, metadata: { context } } as any).el;
    const reply = this.bubble({ role: 'assistant', content: '' }, true).el;
    reply.classList.add('offgrid-mod-streaming');
    this.messages.append(question, reply);
    this.scrollToEnd();
    this.state.textContent = 'Sending…';
    const body = reply.querySelector('.offgrid-bubble-body') as HTMLElement;
    let content = '';
    const calls: { name: string; arguments: unknown }[] = [];
    const settings = this.opts.settings();
    try {
      const stream = this.client.chat(session.id, message, {
        max_tokens: settings.maxTokens,
        temperature: settings.temperature,
        ...(context.length ? { context } : {}),
        signal: controller.signal
      });
      for await (const ev of stream) {
        this.onEvent(ev as ChatEvent);
        if (ev.event === 'waiting' && !this.following) {
          void this.follow(session.id, question); // the turn it waits for: the same conversation, shown
        } else if (ev.event === 'token') {
          const follow = this.nearBottom(); // follow the reply, unless the reader scrolled up
          content += ev.data.delta;
          body.textContent = content;
          if (follow) {
            this.scrollToEnd();
          }
        } else if (ev.event === 'tool_end') {
          const call = calls.shift();
          reply.before(
            toolLine({ content: ev.data.result ?? `Error: ${ev.data.error}`, metadata: { tool_call: call ?? { name: ev.data.tool_name } } })
          );
        } else if (ev.event === 'tool_start') {
          calls.push({ name: ev.data.tool_name, arguments: ev.data.arguments });
        } else if (ev.event === 'complete') {
          content = ev.data.response?.content ?? content;
        } else if (ev.event === 'error') {
          this.error.textContent = ev.data.message;
        }
      }
    } catch (err) {
      if (!controller.signal.aborted) {
        this.fail(err);
      }
    } finally {
      this.streaming = null;
      this.requestId = null;
      this.send.disabled = false;
      this.stop.disabled = true;
      this.state.textContent = '';
      reply.classList.remove('offgrid-mod-streaming');
      this.opts.turnEnded?.();
      if (this.current?.id === session.id) {
        await this.open(session.id, { scroll: 'keep' }); // what the server stored (a stopped reply keeps its text)
      }
    }
  }

  /** Show the turn running on *sessionId* that another surface started (a cell), as it streams;
   * before *before* (our own question, waiting for it) or at the end. */
  private async follow(sessionId: string, before?: HTMLElement): Promise<void> {
    if (this.following) {
      return;
    }
    const controller = new AbortController();
    this.following = controller;
    if (!before && this.current?.id === sessionId) {
      await this.open(sessionId, { scroll: 'keep' }); // its question is stored by now: show it first
    }
    const reply = this.bubble({ role: 'assistant', content: '' }, true).el;
    reply.classList.add('offgrid-mod-streaming', 'offgrid-mod-following');
    const body = reply.querySelector('.offgrid-bubble-body') as HTMLElement;
    let shown = false;
    let content = '';
    try {
      for await (const ev of this.client.followTurn(sessionId, controller.signal)) {
        if (!shown) {
          if (before) {
            before.before(reply);
          } else {
            this.messages.append(reply);
          }
          shown = true;
          if (!this.streaming) {
            this.state.textContent = 'Another turn of this conversation (a notebook cell?) is writing…';
          }
        }
        if (ev.event === 'token') {
          const follow = this.nearBottom();
          content += ev.data.delta;
          body.textContent = content;
          if (follow) {
            this.scrollToEnd();
          }
        }
      }
    } catch {
      // it ended, or the reader left: the stored turn is shown below
    } finally {
      this.following = null;
      if (!this.streaming) {
        this.state.textContent = '';
        if (this.current?.id === sessionId && shown) {
          await this.open(sessionId, { scroll: 'keep' });
        }
      } else if (shown) {
        reply.classList.remove('offgrid-mod-streaming'); // it stays until our own turn ends and all is reloaded
      }
    }
  }

  private onEvent(ev: ChatEvent): void {
    if (ev.data && typeof ev.data.request_id === 'string') {
      this.requestId = ev.data.request_id;
    }
    if (ev.event === 'waiting') {
      this.state.textContent = `Waiting for the turn already running in this conversation (${Math.round(ev.data.waited_s)} s)…`;
    } else if (ev.event === 'queued') {
      this.state.textContent = `Queued: position ${ev.data.position}`;
    } else if (ev.event === 'loading') {
      this.state.textContent = 'Loading the model…';
    } else if (ev.event === 'start') {
      this.state.textContent = 'Generating…';
    } else if (ev.event === 'tool_start') {
      this.state.textContent = `Calling ${ev.data.tool_name}…`;
    } else if (ev.event === 'round_start' && ev.data.round > 1) {
      this.state.textContent = `Round ${ev.data.round} of ${ev.data.max_rounds}…`;
    }
  }

  stopReply(): void {
    if (!this.streaming) {
      return;
    }
    if (this.requestId) {
      void this.client.cancel(this.requestId).catch(() => undefined); // the stream ends with what was kept
    } else {
      this.streaming.abort(); // still waiting: leaving the stream cancels the turn
    }
  }

  /** Send *message* to the conversation of the notebook at *path* (a cell command): the session its
   * cells use, else a new one bound to it; or, with no notebook, the open session (else a new one). */
  async askAbout(path: string | null, message: string): Promise<void> {
    this.fail(null);
    try {
      let ref: string | null = null;
      if (path) {
        ref = await this.notebookSession(path);
      } else if (this.current) {
        ref = this.current.id;
      } else {
        ref = (await this.client.createSession({})).id;
      }
      await this.refresh();
      if (this.current?.id !== ref) {
        await this.open(ref, { notebook: path });
      }
      this.showView('chats');
      await this.submit(message);
    } catch (err) {
      this.fail(err);
    }
  }
}

/** A tool call the model made and what it returned, collapsed to one line (a stored `tool` message). */
function toolLine(m: { content: string; metadata?: Record<string, any> }): HTMLElement {
  const call = (m.metadata?.tool_call ?? {}) as { name?: string; arguments?: Record<string, unknown> };
  const args = Object.entries(call.arguments ?? {})
    .map(([k, v]) => `${k}=${JSON.stringify(v)}`)
    .join(', ');
  const short = m.content.length > 80 ? m.content.slice(0, 79) + '…' : m.content;
  const summary = h('summary', {}, `🔧 called ${call.name ?? 'a tool'}(${args}) → ${short}`);
  return h('details', { class: 'offgrid-tool-call', 'data-role': 'tool' }, summary, h('pre', {}, m.content));
}
