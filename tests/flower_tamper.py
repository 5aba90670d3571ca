"""`fedmoe run` whose server receives hostile train replies through Flower (tests/test_hostile_input.py): the
ServerApp's grid is wrapped and the train replies of client 1 and client 2 are changed as they arrive — client
1 claims n_train = 1e15, client 2 names a dtype that is not one fedmoe bit-casts. The arguments are `fedmoe`'s."""

import json
import sys

from fedmoe.federation.flower import server


class TamperingGrid:
    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def pull_messages(self, ids):
        got = list(self._grid.pull_messages(ids))
        for m in got:
            if m.metadata.message_type != "train" or not m.has_content() or "info" not in m.content:
                continue
            client = json.loads(m.content["info"]["json"])["client"]
            if client == 1:
                m.content["scalars"]["n_train"] = 1e15
            elif client == 2:
                name = next(iter(m.content["tensors"].keys()))
                m.content["header"]["dtypes"] = json.dumps({name: "load"})
        return got


def main() -> None:
    plain = server.FlowerTransport.__init__

    def tampering(self, grid, *args, **kwargs):
        plain(self, TamperingGrid(grid), *args, **kwargs)

    server.FlowerTransport.__init__ = tampering
    from fedmoe.cli import main as cli

    cli()


if __name__ == "__main__":
    sys.exit(main())
