"""QUIC handshakes that never go further: from each of COUNT addresses,
FIRST and the ones after it, a client's first flight (aioquic, ALPN h3)
sent to HOST:PORT, then nothing; the sockets stay open, unread, for
SECONDS. To the gateway this is a flood of handshakes from forged source
addresses: nobody answers from them.

    python3 quic_initials.py HOST:PORT FIRST COUNT SECONDS

Prints `sent N datagrams from COUNT addresses` once they are out.
"""

import ipaddress
import socket
import sys
import time

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    host, port = sys.argv[1].rsplit(":", 1)
    gateway = (host, int(port))
    first = ipaddress.IPv4Address(sys.argv[2])
    count, hold = int(sys.argv[3]), float(sys.argv[4])
    sockets, sent = [], 0
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((str(first + i), 0))
        quic = QuicConnection(configuration=QuicConfiguration(
            is_client=True, alpn_protocols=H3_ALPN, server_name="gateway"))
        quic.connect(gateway, now=time.time())
        for data, _ in quic.datagrams_to_send(now=time.time()):
            s.sendto(data, gateway)
            sent += 1
        sockets.append(s)
    print(f"sent {sent} datagrams from {count} addresses", flush=True)
    time.sleep(hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
