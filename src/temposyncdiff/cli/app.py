"""tsd-app [port=7860] [host=127.0.0.1]: the local web app (Gradio, pip install -e .[app]) -> http://127.0.0.1:7860."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from temposyncdiff.app.jobs import base_settings
from temposyncdiff.cli.common import hydra_main
from temposyncdiff.errors import UserError
from temposyncdiff.utils.task import task


@task
def app(cfg: DictConfig) -> None:
    """Check the app's tsd-infer settings, then serve the page until Ctrl-C."""
    base_settings(cfg)  # a bad infer.* setting fails here, not in the page
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported and when the page is built
    try:
        from temposyncdiff.app.page import launch
    except ImportError as err:
        raise UserError(f"tsd-app needs gradio ({err}): pip install -e '.[app]'") from None
    launch(cfg)


def main() -> None:
    hydra_main("app", app)


if __name__ == "__main__":
    main()
