"""The help screen: what each screen is for and every key, generated from the bindings so it is
never out of date."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Markdown

ABOUT = """\
# miStudio

A terminal dashboard for the miStudio daemon (`mistudiod`): it trains sparse autoencoders on a
language model's activations, shows their progress live, and browses the features they learn.

- **Dashboard**: the GPUs (or the CPU when there is none), every job, the loss of running jobs.
- **New job**: a training job's form; fields are checked as you type and the memory preflight
  says whether the model fits before you submit.
- **Job detail**: live loss, L0, FVE and dead-latent curves, the log, the result when done.
- **Features** (`f`): an SAE's features, sorted and searched (`~` searches by meaning); a
  feature's card shows its top examples shaded by activation, its range, histogram, logit
  effects, explanations, scores and neighbours, and explains or scores it again.
- **Monitor** (`m` on an SAE, its features or a card): type or paste text and see each token
  shaded by a feature's activation, with the strongest features of the token under the cursor;
  or let the model generate after the text and watch it stream.
- **Steer** (`S` on a feature's card): a prompt continued twice, as the model does and with
  features added or clamped at chosen strengths, side by side as they stream.

The TUI never waits on the network: when the daemon stops, the status line says
*disconnected, retrying*, and everything resyncs when it is back. `ctrl+p` opens the command
palette, which lists every action.
"""


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "help.tcss"
    BINDINGS = [Binding("escape,q,f1,question_mark", "dismiss", "Close help")]

    def __init__(self, under: Screen) -> None:
        super().__init__()
        self.under = under

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(ABOUT + "\n" + keys_table(self.under))


def keys_table(screen: Screen) -> str:
    """The keys active on `screen` (its own and its base classes', like the monitor's run key,
    its widgets' from this package, like the jobs table's enter, and the app's), as a Markdown
    table."""
    rows = []
    seen = set()
    widgets = [widget for widget in screen.query("*")
               if type(widget).__module__.startswith("tui.")]
    for node in (screen, *widgets, screen.app):
        for cls in type(node).__mro__:
            if not cls.__module__.startswith("tui."):
                continue
            for binding in cls.__dict__.get("BINDINGS", []):
                binding = binding if isinstance(binding, Binding) else Binding(*binding)
                if binding.description and binding.action not in seen:
                    seen.add(binding.action)
                    rows.append(f"| `{binding.key.replace(',', '`, `')}` | "
                                f"{binding.description} |")
    return "## Keys here\n\n| key | action |\n|---|---|\n" + "\n".join(rows)
