/**
 * A saved chat panel (the ipywidgets panel of `%offgrid chat`): live when the notebook's kernel
 * still holds its widget, else the readable snapshot the server wrote when the notebook was saved.
 *
 * The server's pre-save hook keeps, in the file, the widget's view (`{model_id, ...}`) and the
 * snapshot under PANEL_MIME (plus the snapshot as Markdown for every other viewer). Rendered as a
 * widget view outright, a panel whose kernel is gone would show "Error displaying widget: model
 * not found" (and log it); as Markdown outright, a page reloaded while the kernel runs would lose
 * the live panel. So this renderer asks the notebook's widget manager, once it has restored the
 * kernel's widgets, whether it holds the model, and shows whichever applies.
 */

import { INotebookTracker } from '@jupyterlab/notebook';
import { IRenderMime, MimeModel } from '@jupyterlab/rendermime';
import { Panel } from '@lumino/widgets';

export const PANEL_MIME = 'application/vnd.offgrid.panel+json';
const WIDGET_MIME = 'application/vnd.jupyter.widget-view+json';
const RESTORE_WAIT_MS = 10000; // the longest the live panel is waited for after a reload

interface PanelData {
  view: { model_id: string; version_major?: number; version_minor?: number };
  snapshot: string;
}

/** The parts of ipywidgets' notebook widget manager this uses (jupyterlab-manager's WidgetManager;
 * its renderer keeps it in `_manager`, a private field this relies on, and falls back to the
 * snapshot without). */
interface WidgetManager {
  restoredStatus: boolean;
  restored: { connect(fn: () => void): void; disconnect(fn: () => void): void };
  has_model(id: string): boolean;
}

export class PanelRenderer extends Panel implements IRenderMime.IRenderer {
  private resolveAttached: () => void = () => undefined;
  private readonly attached = new Promise<void>(resolve => (this.resolveAttached = resolve));

  constructor(
    private readonly options: IRenderMime.IRendererOptions,
    private readonly notebooks: INotebookTracker | null
  ) {
    super();
    this.addClass('offgrid-saved-panel');
  }

  protected onAfterAttach(): void {
    this.resolveAttached();
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const data = model.data[PANEL_MIME] as unknown as PanelData;
    await Promise.race([this.attached, new Promise(r => setTimeout(r, RESTORE_WAIT_MS))]);
    const rendermime = this.notebooks?.find(p => p.node.contains(this.node))?.content.rendermime;
    const live = rendermime && data?.view?.model_id ? await this.liveView(rendermime, data) : null;
    if (live) {
      this.addWidget(live);
      return;
    }
    const markdown = (rendermime ?? null)?.createRenderer('text/markdown');
    if (markdown) {
      this.addWidget(markdown);
      await markdown.renderModel(new MimeModel({ data: { 'text/markdown': data?.snapshot ?? '' } }));
    } else {
      this.node.textContent = data?.snapshot ?? '';
    }
  }

  /** The panel's live view, if the notebook's kernel still holds its widget; else null. */
  private async liveView(rendermime: any, data: PanelData): Promise<IRenderMime.IRenderer | null> {
    const found = await this.managedRenderer(rendermime);
    if (!found) {
      return null;
    }
    const [renderer, manager] = found;
    if (!manager.restoredStatus) {
      await new Promise<void>(resolve => {
        const done = () => {
          manager.restored.disconnect(done);
          resolve();
        };
        manager.restored.connect(done);
        setTimeout(done, RESTORE_WAIT_MS);
      });
    }
    if (!manager.has_model(data.view.model_id)) {
      renderer.dispose();
      return null;
    }
    await renderer.renderModel(new MimeModel({ data: { [WIDGET_MIME]: data.view as any } }));
    return renderer;
  }

  /** A widget-view renderer bound to the notebook's widget manager, and the manager. The notebook's
   * rendermime holds a placeholder factory until ipywidgets binds one to the notebook's manager
   * (shortly after the notebook opens): asked again until then. */
  private async managedRenderer(rendermime: any): Promise<[IRenderMime.IRenderer, WidgetManager] | null> {
    const deadline = Date.now() + RESTORE_WAIT_MS;
    while (Date.now() < deadline) {
      const factory = rendermime.getFactory(WIDGET_MIME);
      if (!factory) {
        return null; // no ipywidgets here
      }
      const renderer = factory.createRenderer({ ...this.options, mimeType: WIDGET_MIME });
      const pending = (renderer as any)._manager?.promise as Promise<WidgetManager> | undefined;
      if (!pending) {
        renderer.dispose();
        return null;
      }
      const manager = await Promise.race([pending, new Promise<null>(r => setTimeout(() => r(null), 50))]);
      if (manager && typeof manager.has_model === 'function') {
        return [renderer, manager];
      }
      renderer.dispose();
      await new Promise(r => setTimeout(r, 200));
    }
    return null;
  }
}

/** The renderer factory, for the application's rendermime (notebooks clone it). */
export function panelRendererFactory(notebooks: INotebookTracker | null): IRenderMime.IRendererFactory {
  return {
    safe: true,
    mimeTypes: [PANEL_MIME],
    defaultRank: 0, // before the Markdown fallback
    createRenderer: options => new PanelRenderer(options, notebooks)
  };
}
