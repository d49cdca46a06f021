"""Register a device with Berth using the official Azure IoT Python device client, unmodified.

    pip install azure-iot-device
    python examples/register_device.py --id-scope 0ne0000ABCD --registration-id toaster-007 \
        --key '<device key>' --ca berth-data/ca.pem [--websockets] [--host localhost]

The Python device client always connects to port 8883 (MQTT) or 443 (MQTT over WebSocket), so
Berth must serve those ports (`berth serve` with its default ports, as root or with
CAP_NET_BIND_SERVICE).
"""

import argparse
import json

from azure.iot.device import ProvisioningDeviceClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="localhost", help="Berth's host name (default: localhost)")
    parser.add_argument("--id-scope", required=True, help="the ID scope `berth id-scope` prints")
    parser.add_argument("--registration-id", required=True)
    parser.add_argument("--key", required=True, help="the device key (for a group: `berth compute-device-key`)")
    parser.add_argument("--ca", required=True, help="the CA file Berth wrote (berth-data/ca.pem)")
    parser.add_argument("--websockets", action="store_true", help="MQTT over WebSocket on 443 instead of MQTT on 8883")
    parser.add_argument("--payload", help="a JSON object sent to the allocation policy")
    args = parser.parse_args()

    with open(args.ca, encoding="utf-8") as ca_file:
        ca = ca_file.read()
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=args.host,
        registration_id=args.registration_id,
        id_scope=args.id_scope,
        symmetric_key=args.key,
        websockets=args.websockets,
        server_verification_cert=ca,
    )
    if args.payload:
        client.provisioning_payload = json.loads(args.payload)
    result = client.register()
    state = result.registration_state
    print(f"status:       {result.status}")
    if state is not None:
        print(f"assigned hub: {state.assigned_hub}")
        print(f"device id:    {state.device_id}")
        print(f"substatus:    {state.sub_status}")


if __name__ == "__main__":
    main()
