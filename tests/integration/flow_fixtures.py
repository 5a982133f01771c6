"""A user flow for the tests, imported by the ranks through PYTHONPATH=tests/integration:
its schedule depends on the world rank it runs on, which hpcalign must refuse at start-up."""

import os

from hpcalign.flows import Flow, Step


class RankDependentFlow(Flow):
    """A broken flow: another schedule on every rank (a data- or place-dependent schedule)."""

    models = ("policy",)

    def schedule(self):
        rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMIX_RANK", "?")
        return (*super().schedule(), Step("trainer", "policy", f"rank-{rank}", "trainers"))
