"""What other packages hand djinn through entry points, so that djinnd imports none of them:
subcommands of `djinn` (group `djinn.commands`) and the daemon's scenario catalog (`djinn.scenarios`)."""

from importlib.metadata import entry_points


def commands() -> list[tuple[str, object]]:
    """(name, typer app) of each subcommand."""
    return [(ep.name, ep.load()) for ep in entry_points(group="djinn.commands")]


def scenario_catalog() -> dict | None:
    """{"scenarios": [...], "run": argv prefix} from the first provider; None when none is installed."""
    for ep in entry_points(group="djinn.scenarios"):
        return ep.load()()
    return None
