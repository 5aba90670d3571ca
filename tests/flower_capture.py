"""`fedmoe run` with every Flower message the server sends or receives recorded (tests/test_flower.py's checks
that a client's test data and its unmasked update do not leave it). The ServerApp's grid is wrapped, so the
messages of fedmoe's loop and of SecAgg+ are all seen: each one's records are appended to ``sys.argv[1]`` (its
JSON and metrics as text, its arrays' raw bytes) and one line per message to ``sys.argv[1] + ".jsonl"``
(direction, message type, each record's arrays with dtype and size, and its other values); the rest of the arguments are `fedmoe`'s."""

import json
import sys

from fedmoe.federation.flower import server


def _dump(path, message, direction: str) -> None:
    content = message.content if message.has_content() else None
    line = {"direction": direction, "type": message.metadata.message_type, "records": {}, "values": {}}
    with open(path, "ab") as out:
        if content is None:
            out.write(f"[error] {message.error.reason}\n".encode())
        else:
            for name, record in content.items():
                out.write(f"[{message.metadata.message_type} {name}]\n".encode())
                arrays, values = {}, {}
                for key, value in record.items():
                    data = getattr(value, "data", None)
                    if isinstance(data, bytes):
                        arrays[key] = {"dtype": str(value.dtype), "bytes": len(data)}
                        out.write(data)
                    else:
                        out.write(f"{key}={value}\n".encode())
                        values[key] = value if isinstance(value, (int, float, str)) else str(value)
                line["records"][name] = arrays
                line["values"][name] = values
    with open(f"{path}.jsonl", "a") as index:
        index.write(json.dumps(line) + "\n")


class RecordingGrid:
    def __init__(self, grid, path):
        self._grid, self._path = grid, path

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            _dump(self._path, m, "to-client")
        return self._grid.push_messages(messages)

    def pull_messages(self, ids):
        got = list(self._grid.pull_messages(ids))
        for m in got:
            _dump(self._path, m, "from-client")
        return got


def main() -> None:
    path, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    plain = server.FlowerTransport.__init__

    def recording(self, grid, *args, **kwargs):
        plain(self, RecordingGrid(grid, path), *args, **kwargs)

    server.FlowerTransport.__init__ = recording
    from fedmoe.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
