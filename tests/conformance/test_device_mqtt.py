"""MQTT-level behaviour of the device endpoint (wire-protocol.md §5), with a raw MQTT 3.1.1 client
(paho-mqtt 1.6.1, the version the device SDK pins) over TLS to localhost:8883 trusting the CA:
the topic contract, MQTT over WebSocket on any path, and that a misbehaving client (garbage bytes,
unknown topics, a wrong password) harms nobody else."""

from __future__ import annotations

import json
import queue
import re
import socket
import ssl
import threading
import time
import uuid
from typing import Optional

import paho.mqtt.client as mqtt
import pytest

from helpers import (
    MQTT_API_VERSION,
    assert_hub_device,
    assert_no_hub_device,
    device_sas_token,
    parse_utc,
    random_key,
    symmetric_key_enrollment,
    unique_id,
)

RESPONSE_TOPIC = re.compile(r"^\$dps/registrations/res/(\d{3})/\?\$rid=([^&$]+)(?:&retry-after=(\d+))?$")
WAIT = 10  # seconds to wait for a CONNACK, SUBACK or response


class RawDevice:
    """One MQTT connection speaking the DPS topics by hand."""

    def __init__(self, server, registration_id: str, password: Optional[str], *, websockets: bool = False,
                 ws_path: str = "/$iothub/websocket"):
        self.registration_id = registration_id
        self.client = mqtt.Client(
            client_id=registration_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            transport="websockets" if websockets else "tcp",
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(ssl.create_default_context(cafile=str(server.ca_path)))
        if websockets:
            self.client.ws_set_options(path=ws_path)
        self.client.username_pw_set(
            f"{server.id_scope}/registrations/{registration_id}/api-version={MQTT_API_VERSION}"
            f"&ClientVersion=berth-conformance%2F1.0",
            password,
        )
        self.port = 443 if websockets else server.mqtt_port
        self.connack: "queue.Queue" = queue.Queue()
        self.subacks: "queue.Queue" = queue.Queue()
        self.messages: "queue.Queue" = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda c, u, flags, rc: self.connack.put((flags, rc))
        self.client.on_subscribe = lambda c, u, mid, granted: self.subacks.put(tuple(granted))
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, msg.payload, msg.qos))
        self.client.on_disconnect = lambda c, u, rc: self.disconnected.set()

    def connect(self) -> tuple:
        """Connect and return (flags, CONNACK return code)."""
        self.client.connect("localhost", self.port, keepalive=60)
        self.client.loop_start()
        try:
            return self.connack.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no CONNACK within {WAIT}s") from None

    def subscribe(self) -> tuple:
        self.client.subscribe("$dps/registrations/res/#", qos=1)
        try:
            return self.subacks.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no SUBACK within {WAIT}s") from None

    def connect_and_subscribe(self) -> "RawDevice":
        flags, rc = self.connect()
        assert rc == 0, f"CONNACK return code {rc}"
        assert flags.get("session present") == 0, flags
        assert self.subscribe() == (1,)
        return self

    def next_message(self, timeout: float = WAIT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def request(self, topic: str, payload: bytes, rid: str) -> tuple:
        """Publish a request at QoS 1 and return (status, retry_after or None, body) of its response."""
        self.client.publish(topic, payload, qos=1)
        got = self.next_message()
        assert got is not None, f"no response to {topic} within {WAIT}s"
        response_topic, body, qos = got
        m = RESPONSE_TOPIC.match(response_topic)
        assert m, f"response topic does not follow $dps/registrations/res/{{status}}/?$rid=…: {response_topic!r}"
        assert m.group(2) == rid, f"$rid not echoed: sent {rid!r}, got {response_topic!r}"
        assert qos == 1, f"responses must be published at QoS 1, got {qos}"
        retry_after = int(m.group(3)) if m.group(3) is not None else None
        return int(m.group(1)), retry_after, json.loads(body)

    def register(self, rid: str, payload=None) -> tuple:
        body = json.dumps({"registrationId": self.registration_id, "payload": payload}).encode()
        return self.request(f"$dps/registrations/PUT/iotdps-register/?$rid={rid}", body, rid)

    def poll(self, rid: str, operation_id: str) -> tuple:
        topic = f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation_id}"
        return self.request(topic, b" ", rid)

    def register_until_done(self, limit: float = 30) -> dict:
        """Register, then poll as retry-after says; every 202 is checked. Returns the final body."""
        status, retry_after, body = self.register("1")
        assert status == 202, (status, body)
        assert retry_after is not None and 2 <= retry_after <= 5, retry_after
        assert body["status"] == "assigning", body
        assert body["registrationState"]["registrationId"] == self.registration_id, body
        operation_id = body["operationId"]
        deadline = time.monotonic() + limit
        wait, rid = 0.2, 2
        while True:
            time.sleep(wait)
            status, retry_after, body = self.poll(str(rid), operation_id)
            rid += 1
            if status == 200:
                assert body["operationId"] == operation_id, body
                return body
            assert status == 202, (status, body)
            assert retry_after is not None and 2 <= retry_after <= 5, retry_after
            assert body["status"] == "assigning", body
            wait = retry_after
            assert time.monotonic() + wait < deadline, "still assigning"

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def _enrolled_device(server, device_client, hub, prefix: str, **kwargs) -> RawDevice:
    reg_id = unique_id(prefix)
    primary = random_key(32)
    device_client.enrollment.create_or_update(reg_id, symmetric_key_enrollment(reg_id, hubs=[hub], primary=primary))
    token = device_sas_token(server.id_scope, reg_id, primary)
    device = RawDevice(server, reg_id, token, **kwargs)
    device.primary = primary
    return device


def _assert_assigned(final: dict, device: RawDevice, hub: str) -> None:
    assert final["status"] == "assigned", final
    state = final["registrationState"]
    assert state["registrationId"] == device.registration_id, state
    assert state["assignedHub"] == hub, state
    assert state["deviceId"] == device.registration_id, state
    assert state["status"] == "assigned", state
    assert state["substatus"] == "initialAssignment", state
    assert parse_utc(state["lastUpdatedDateTimeUtc"]) >= parse_utc(state["createdDateTimeUtc"]), state


def _connection_closed(sock: ssl.SSLSocket, timeout: float) -> bool:
    """True when the server closes (or resets) the connection within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionError, ssl.SSLError, OSError) as exc:
        if isinstance(exc, socket.timeout):
            return False
        return True


# --------------------------------------------------------------------------------------------


def test_raw_mqtt_register_and_poll_follow_the_dps_topic_contract(device_server, device_client, device_hub):
    device = _enrolled_device(device_server, device_client, device_hub, "mqtt-raw")
    try:
        device.connect_and_subscribe()
        rid = str(uuid.uuid4())

        status, retry_after, body = device.register(rid)

        assert status == 202, body
        assert retry_after is not None and 2 <= retry_after <= 5, retry_after
        assert body["status"] == "assigning" and body["operationId"], body
        final = None
        for attempt in range(10):
            time.sleep(0.2 if attempt == 0 else retry_after)
            status, retry_after, final = device.poll(f"{rid}-{attempt}", body["operationId"])
            if status == 200:
                break
            assert status == 202 and retry_after is not None and 2 <= retry_after <= 5, (status, retry_after)
        assert status == 200, final
        _assert_assigned(final, device, device_hub)
        assert_hub_device(device_client, device_hub, device.registration_id, primary=device.primary)
    finally:
        device.close()


def test_empty_register_payload_and_qos_0_requests_are_answered_at_qos_1(device_server, device_client, device_hub):
    # C# sends a zero-byte register payload; C and Java publish requests at QoS 0 (§5.4).
    device = _enrolled_device(device_server, device_client, device_hub, "mqtt-quirks")
    try:
        device.connect_and_subscribe()

        status, retry_after, body = device.request("$dps/registrations/PUT/iotdps-register/?$rid=7", b"", "7")
        assert status == 202 and body["status"] == "assigning", body
        assert retry_after is not None and 2 <= retry_after <= 5, retry_after

        time.sleep(0.5)
        device.client.publish(
            f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=8&operationId={body['operationId']}", b"", qos=0
        )
        got = device.next_message()
        assert got is not None, "no answer to a QoS 0 request"
        topic, payload, qos = got
        assert RESPONSE_TOPIC.match(topic) and RESPONSE_TOPIC.match(topic).group(2) == "8", topic
        assert qos == 1, qos
        assert json.loads(payload)["operationId"] == body["operationId"], payload
    finally:
        device.close()


def test_subscription_to_another_filter_is_refused_with_0x80(device_server, device_client, device_hub):
    device = _enrolled_device(device_server, device_client, device_hub, "mqtt-subfilter")
    try:
        device.connect_and_subscribe()
        device.client.subscribe("devices/#", qos=1)
        assert device.subacks.get(timeout=WAIT) == (0x80,)
    finally:
        device.close()


def test_sixth_poll_within_10_seconds_gets_res_429_with_retry_after(device_server, device_client, device_hub):
    device = _enrolled_device(device_server, device_client, device_hub, "mqtt-throttle")
    try:
        device.connect_and_subscribe()
        _, _, body = device.register("1")

        answers = [device.poll(str(10 + i), body["operationId"]) for i in range(6)]

        assert all(status in (200, 202) for status, _, _ in answers[:5]), [a[:2] for a in answers]
        status, retry_after, error = answers[5]
        assert status == 429, answers[5]
        assert retry_after is not None and retry_after >= 1, answers[5]
        assert error["errorCode"] // 1000 == 429 and error["trackingId"] and error["message"], error
    finally:
        device.close()


def test_raw_mqtt_over_websocket_on_path_slash_registers(device_server, device_client, device_hub):
    # C# and Java connect to wss://host:443/ (path "/"); the Python SDK uses /$iothub/websocket.
    device = _enrolled_device(device_server, device_client, device_hub, "mqtt-ws-slash", websockets=True, ws_path="/")
    try:
        device.connect_and_subscribe()
        _assert_assigned(device.register_until_done(), device, device_hub)
    finally:
        device.close()


def test_garbage_instead_of_connect_closes_that_connection_and_others_still_register(
    device_server, device_client, device_hub
):
    device = _enrolled_device(device_server, device_client, device_hub, "mqtt-neighbour")
    try:
        device.connect_and_subscribe()
        context = ssl.create_default_context(cafile=str(device_server.ca_path))
        with socket.create_connection(("localhost", device_server.mqtt_port), timeout=WAIT) as tcp:
            with context.wrap_socket(tcp, server_hostname="localhost") as tls:
                tls.sendall(b"\xde\xad\xbe\xef" * 64 + b"GET / HTTP/1.1\r\n\r\n")
                assert _connection_closed(tls, WAIT), "the server kept a connection that sent garbage open"

        _assert_assigned(device.register_until_done(), device, device_hub)
    finally:
        device.close()


def test_publish_to_unknown_topic_gets_no_answer_and_others_still_register(device_server, device_client, device_hub):
    rogue = _enrolled_device(device_server, device_client, device_hub, "mqtt-rogue")
    neighbour = _enrolled_device(device_server, device_client, device_hub, "mqtt-neighbour")
    try:
        rogue.connect_and_subscribe()
        neighbour.connect_and_subscribe()

        rogue.client.publish("$dps/registrations/PUT/iotdps-unknown/?$rid=1", b"{}", qos=1)
        rogue.client.publish(f"devices/{rogue.registration_id}/messages/events/", b"hello", qos=1)
        answer = rogue.next_message(timeout=3)
        closed = rogue.disconnected.wait(timeout=1)

        # Berth may close the rogue connection or ignore the publishes; it must never answer them.
        assert answer is None, f"unknown topics got an answer: {answer!r} (closed={closed})"
        _assert_assigned(neighbour.register_until_done(), neighbour, device_hub)
    finally:
        rogue.close()
        neighbour.close()


def test_wrong_password_is_refused_with_connack_5_or_a_401_answer(device_server, device_client, device_hub):
    reg_id = unique_id("mqtt-badpw")
    device_client.enrollment.create_or_update(
        reg_id, symmetric_key_enrollment(reg_id, hubs=[device_hub], primary=random_key(32))
    )
    device = RawDevice(device_server, reg_id, device_sas_token(device_server.id_scope, reg_id, random_key(32)))
    try:
        flags, rc = device.connect()
        if rc == 0:
            assert device.subscribe() == (1,)
            status, _, body = device.register("1")
            assert status == 401, body
            assert body["errorCode"] == 401002, body
            assert body["trackingId"] and body["message"], body
            parse_utc(body["timestampUtc"])
        else:
            assert rc == 5, f"CONNACK return code {rc} (expected 5, not authorized)"
        assert_no_hub_device(device_client, device_hub, reg_id)
    finally:
        device.close()
