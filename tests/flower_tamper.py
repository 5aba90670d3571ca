"""`fedmoe run` whose server receives hostile train replies through Flower (tests/test_hostile_input.py): the
ServerApp's grid is wrapped and the train replies of clients 1, 2 and 3 are changed as they arrive — client
1 claims n_train = 1e15, client 2 names a dtype that is not one fedmoe bit-casts, client 3 adds a 32 MiB tensor
the method does not expect. The arguments are `fedmoe`'s."""

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
            elif client == 3:
                import numpy as np
                from flwr.app import Array

                m.content["tensors"]["junk"] = Array(np.zeros(8 << 20, dtype=np.float32))
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
