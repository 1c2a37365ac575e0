import tempfile
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from apps.tenancy.models import Role, Tenant
from apps.tenancy.services import membership_add, tenant_create

DEMO_EMAIL = "demo@tunehouse.local"
DEMO_PASSWORD = "tunehouse-demo"  # noqa: S105 - the documented local demo login, created by `make up` only


class Command(BaseCommand):
    help = (
        "Create the demo tenant and its owner login if missing, and give it the sample datasets "
        "(idempotent; `make up` runs it once Redis and the workers are up, so the samples get validated)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--no-samples", action="store_true", help="Only the tenant and the login.")

    def handle(self, *args, no_samples: bool = False, **options):
        user_model = get_user_model()
        with transaction.atomic():
            user, created = user_model.objects.get_or_create(username=DEMO_EMAIL, defaults={"email": DEMO_EMAIL})
            if created:
                user.set_password(DEMO_PASSWORD)
                user.save()
            tenant = Tenant.objects.filter(slug="demo").first()
            if tenant is None:
                tenant = tenant_create(slug="demo", name="Demo team", owner=user)
            else:
                membership_add(tenant=tenant, user=user, role=Role.OWNER)
        if not no_samples:
            self._upload_samples(tenant, user)
        self.stdout.write(f"Demo login: {DEMO_EMAIL} / {DEMO_PASSWORD}")

    def _upload_samples(self, tenant, user) -> None:
        from apps.datasets.services import READ_CHUNK_BYTES, file_upload
        from workers.ml.data.samples import write_sample_datasets

        with tempfile.TemporaryDirectory() as folder:
            for name, path in sorted(write_sample_datasets(folder).items()):
                with open(path, "rb") as handle:
                    # An identical re-upload returns the stored file, so running this twice adds nothing.
                    file_upload(
                        tenant=tenant,
                        user=user,
                        filename=Path(name).name,
                        chunks=iter(lambda handle=handle: handle.read(READ_CHUNK_BYTES), b""),
                        purpose="fine-tune",
                    )
