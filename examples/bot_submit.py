"""Submit an application the way a Telegram bot does: gRPC stubs generated from proto/.

    python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. proto/crm/v1/*.proto
    CRM_TOKEN=<raw token> python examples/bot_submit.py [host:port]
"""

import os
import sys

import grpc

from crm.v1 import application_pb2, application_pb2_grpc


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    metadata = [("x-service-token", os.environ["CRM_TOKEN"])]
    with grpc.insecure_channel(target) as channel:
        stub = application_pb2_grpc.ApplicationServiceStub(channel)
        catalog = stub.ListPrograms(application_pb2.ListProgramsRequest(), metadata=metadata)
        print("programs:", [p.code for p in catalog.programs], "etag:", catalog.etag)
        created = stub.SubmitApplication(
            application_pb2.SubmitApplicationRequest(
                full_name="Aziz Karimov",
                phone="+998901234567",
                telegram_user_id=123456789,
                program_code=catalog.programs[0].code,
                language="uz",
                answers={"school": "Lyceum 1"},
            ),
            metadata=metadata,
        )
        print("submitted:", created.id, "source:", created.source,
              "status:", application_pb2.ApplicationStatus.Name(created.status))


if __name__ == "__main__":
    main()
