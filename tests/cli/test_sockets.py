"""The HTTP listeners of `tokenmill serve` and `tokenmill route` get Nagle turned off."""

from __future__ import annotations


def test_the_listening_sockets_say_tcp_so_asyncio_turns_nagle_off():
    import socket

    from tokenmill.cli.route import listen_socket
    from tokenmill.server.serve import _bind

    for sock in (listen_socket("127.0.0.1", 0), _bind("127.0.0.1", 0)):
        with sock:
            assert sock.proto == socket.IPPROTO_TCP
            sock.listen()
            client = socket.create_connection(sock.getsockname())
            accepted, _ = sock.accept()
            with client, accepted:
                assert accepted.proto == socket.IPPROTO_TCP  # what asyncio checks before TCP_NODELAY
