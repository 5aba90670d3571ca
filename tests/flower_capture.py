"""`fedmoe run` with every Flower message the server sends or receives written to a file (tests/test_flower.py's
check that a client's test data does not leave it): each message's records, its JSON and metrics as text and its
arrays' raw bytes, appended to ``sys.argv[1]``; the rest of the arguments are `fedmoe`'s."""

import sys

from fedmoe.federation.flower import server


def _dump(out, message) -> None:
    content = message.content if message.has_content() else None
    if content is None:
        out.write(f"[error] {message.error.reason}\n".encode())
        return
    for name, record in content.items():
        out.write(f"[{message.metadata.message_type} {name}]\n".encode())
        for key, value in record.items():
            data = getattr(value, "data", None)
            out.write(data if isinstance(data, bytes) else f"{key}={value}\n".encode())


def main() -> None:
    path, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    plain = server.FlowerTransport._send_and_receive

    def recorded(self, messages):
        replies = plain(self, messages)
        with open(path, "ab") as out:
            for m in [*messages, *replies]:
                _dump(out, m)
        return replies

    server.FlowerTransport._send_and_receive = recorded
    from fedmoe.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
