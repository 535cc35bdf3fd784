"""A CONNECT-IP (RFC 9484) client written on aioquic, an HTTP/3
implementation independent of veil's: it reads a veil profile, opens the
session (extended CONNECT, :protocol connect-ip, capsules), takes the
address the gateway assigns, sends one UDP packet in an HTTP datagram
(context ID 0) and prints what comes back.

    python3 connect_ip_aioquic.py PROFILE HOST:PORT REMOTE:PORT MESSAGE [MODE]

Exit status 0 when the reply echoes MESSAGE; the lines printed say what
each side sent (for the test's assertions and for reading a failure).

MODE makes the client hostile, within the protocol's rules:

- `park:BYTES`: once the session carries packets, it writes BYTES on each
  of three streams the gateway never reads again (its control stream, as
  one frame of a reserved type, and two new unidirectional streams of a
  reserved type), gives flow control a few seconds, says how many of
  those bytes the gateway took, and checks that the session still
  carries a packet.
- `silent` or `silent:SECONDS`: after the QUIC handshake and its SETTINGS
  it sends no request (for SECONDS, only datagrams of one byte, as fast
  as it can), and says when the gateway closed the connection.
- `tiny:BYTES`: it announces that it takes QUIC DATAGRAM frames of at
  most BYTES (`max_datagram_frame_size`), sends its request and says
  when the gateway closed the connection.
- `deaf:SECONDS`: once the session carries packets, it acknowledges
  nothing more the gateway sends, and for SECONDS sends as fast as it can
  datagrams the remote's echo service answers (UDP to port 7: each comes
  back through the datapath). What the gateway did about it is for the
  caller to see in its log and status.
"""

import asyncio
import ipaddress
import os
import struct
import sys
import tempfile
import time
import tomllib

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, UINT_VAR_MAX_SIZE
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DatagramReceived, DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

ADDRESS_ASSIGN = 0x01
ADDRESS_REQUEST = 0x02
ROUTE_ADVERTISEMENT = 0x03


def varint(value: int) -> bytes:
    buf = Buffer(capacity=UINT_VAR_MAX_SIZE)
    buf.push_uint_var(value)
    return buf.data


def capsule(kind: int, payload: bytes) -> bytes:
    return varint(kind) + varint(len(payload)) + payload


def capsules(data: bytes):
    """(type, payload) of each whole capsule in `data`, and the rest."""
    buf = Buffer(data=data)
    whole = []
    while not buf.eof():
        start = buf.tell()
        try:
            kind = buf.pull_uint_var()
            length = buf.pull_uint_var()
            payload = buf.pull_bytes(length)
        except Exception:
            return whole, data[start:]
        whole.append((kind, payload))
    return whole, b""


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(src, dst, sport: int, dport: int, payload: bytes, ttl: int = 64) -> bytes:
    length = 8 + len(payload)
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 17, length)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0x4000, ttl, 17, 0,
        src.packed, dst.packed,
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


class Session(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # aioquic announces SETTINGS_H3_DATAGRAM with its WebTransport
        # support (it also announces ENABLE_WEBTRANSPORT, which veil ignores).
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.events: asyncio.Queue = asyncio.Queue()


    def quic_event_received(self, event):
        for e in self.h3.handle_event(event):
            self.events.put_nowait(e)


async def closed_by_gateway(session, within: float, since: float) -> int:
    """Waits up to `within` s for the gateway to close the connection and
    says so; 0 if it did. aioquic reports the close as an event only after
    its draining period, so its record of the frame is read."""
    deadline = time.monotonic() + within
    while (event := session._quic._close_event) is None:
        if time.monotonic() > deadline:
            print(f"still open after {within:.0f} s", flush=True)
            return 1
        await asyncio.sleep(0.05)
    print(f"closed by the gateway after {time.monotonic() - since:.1f} s: "
          f"error {event.error_code:#x} {event.reason_phrase!r}", flush=True)
    return 0


async def deaf_flood(session, stream: int, src, dst, seconds: float) -> int:
    """Acknowledges nothing from now on and sends, for `seconds`, UDP
    datagrams to the remote's echo port (each answered through the
    datapath; the gateway's own answers, ICMP errors, are rate-limited)."""
    quic = session._quic

    def no_ack(builder, space, now):
        space.ack_at = None

    quic._write_ack_frame = no_ack
    print("flood: ready", flush=True)
    sent = 0
    started = time.monotonic()
    packet = udp_packet(src, dst, 20000, 7, b"echo me")
    while time.monotonic() - started < seconds:
        for _ in range(100):
            session.h3.send_datagram(stream, varint(0) + packet)
            sent += 1
        session.transmit()
        await asyncio.sleep(0)
    print(f"flood: sent {sent}", flush=True)
    return 0


# A frame and a unidirectional stream type of the reserved ranges (RFC
# 9114 §7.2.8, §6.2.3): a receiver ignores them, so sending them is within
# the rules.
RESERVED_TYPE = 0x1F * 7 + 0x21


async def park_on_unread_streams(session, size: int):
    """Writes `size` bytes on each of three streams the gateway does not
    read, lets flow control take what it allows, and prints how much."""
    quic, h3 = session._quic, session.h3
    print("parking: ready", flush=True)
    await asyncio.sleep(1)
    before = quic._remote_max_data_used
    frame = varint(RESERVED_TYPE) + varint(size) + bytes(size)
    quic.send_stream_data(h3._local_control_stream_id, frame)
    for _ in range(2):
        stream = quic.get_next_available_stream_id(is_unidirectional=True)
        quic.send_stream_data(stream, varint(RESERVED_TYPE) + bytes(size))
    session.transmit()
    await asyncio.sleep(3)
    print(f"parked: {quic._remote_max_data_used - before} bytes taken", flush=True)


async def run(profile_path, gateway, remote, message, mode="") -> int:
    hostile, _, arg = mode.partition(":")
    parked = False
    with open(profile_path, "rb") as f:
        profile = tomllib.load(f)
    host, port = gateway.rsplit(":", 1)
    remote_host, remote_port = remote.rsplit(":", 1)
    remote_ip = ipaddress.IPv4Address(remote_host)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for part in ("ca", "cert", "key"):
            paths[part] = os.path.join(tmp, part + ".pem")
            with open(paths[part], "w") as f:
                f.write(profile[part])
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            server_name=profile["server_name"],
            max_datagram_frame_size=int(arg) if hostile == "tiny" else 65536,
        )
        config.load_verify_locations(paths["ca"])
        config.load_cert_chain(paths["cert"], paths["key"])
        async with connect(host, int(port), configuration=config,
                           create_protocol=Session) as session:
            h3 = session.h3
            if hostile == "silent":
                session.transmit()  # its SETTINGS
                since = time.monotonic()
                print("silent: connected", flush=True)
                sent = 0
                while time.monotonic() - since < float(arg or 0):
                    for _ in range(100):
                        session._quic.send_datagram_frame(b"x")
                    sent += 100
                    session.transmit()
                    await asyncio.sleep(0.001)
                if sent:
                    print(f"silent: sent {sent} datagrams", flush=True)
                return await closed_by_gateway(session, 15, since)
            stream = session._quic.get_next_available_stream_id()
            h3.send_headers(stream, [
                (b":method", b"CONNECT"),
                (b":protocol", b"connect-ip"),
                (b":scheme", b"https"),
                (b":authority", profile["server_name"].encode()),
                (b":path", b"/.well-known/masque/ip/*/*/"),
                (b"capsule-protocol", b"?1"),
            ])
            request = varint(1) + bytes([4]) + bytes(4) + bytes([32])
            h3.send_data(stream, capsule(ADDRESS_REQUEST, request), end_stream=False)
            session.transmit()
            print("sent: extended CONNECT, connect-ip, ADDRESS_REQUEST", flush=True)
            if hostile == "tiny":
                return await closed_by_gateway(session, 10, time.monotonic())

            assigned = None
            pending = b""
            sent = False
            while True:
                event = await session.events.get()
                if isinstance(event, HeadersReceived):
                    status = dict(event.headers).get(b":status", b"?").decode()
                    print(f"response: {status}", flush=True)
                    if status != "200":
                        return 1
                elif isinstance(event, DataReceived):
                    whole, pending = capsules(pending + event.data)
                    for kind, payload in whole:
                        if kind == ADDRESS_ASSIGN:
                            buf = Buffer(data=payload)
                            buf.pull_uint_var()  # request ID
                            if buf.pull_uint8() == 4:
                                assigned = ipaddress.IPv4Address(buf.pull_bytes(4))
                                print(f"capsule: ADDRESS_ASSIGN {assigned}", flush=True)
                        elif kind == ROUTE_ADVERTISEMENT:
                            print("capsule: ROUTE_ADVERTISEMENT", flush=True)
                        else:
                            print(f"capsule: type {kind:#x}", flush=True)
                elif isinstance(event, DatagramReceived):
                    context = Buffer(data=event.data)
                    if context.pull_uint_var() != 0:
                        continue
                    packet = event.data[context.tell():]
                    if packet[9] != 17 or packet[12:16] != remote_ip.packed:
                        continue
                    ihl = (packet[0] & 0x0F) * 4
                    reply = packet[ihl + 8:]
                    print(f"datagram: UDP reply from {remote_ip}: {reply.decode(errors='replace')}",
                          flush=True)
                    if reply != message.encode():
                        return 1
                    if hostile == "deaf":
                        return await deaf_flood(session, stream, assigned, remote_ip, float(arg))
                    if hostile != "park" or parked:
                        return 0
                    await park_on_unread_streams(session, int(arg))
                    parked = True
                    sent = False
                if assigned is not None and not sent:
                    packet = udp_packet(assigned, remote_ip, 40000, int(remote_port),
                                        message.encode())
                    h3.send_datagram(stream, varint(0) + packet)
                    session.transmit()
                    sent = True
                    print(f"sent: datagram, context 0, UDP {assigned} -> {remote}", flush=True)


def main() -> int:
    if len(sys.argv) not in (5, 6):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return asyncio.run(asyncio.wait_for(run(*sys.argv[1:]), timeout=90))
    except asyncio.TimeoutError:
        print("timed out", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
