from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from apps.tenancy.models import Role, Tenant
from apps.tenancy.services import membership_add, tenant_create

DEMO_EMAIL = "demo@tunehouse.local"
DEMO_PASSWORD = "tunehouse-demo"  # noqa: S105 - the documented local demo login, created by `make up` only


class Command(BaseCommand):
    help = "Create the demo tenant and its owner login if missing (idempotent; used by `make up`)."

    def handle(self, *args, **options):
        user_model = get_user_model()
        with transaction.atomic():
            user, created = user_model.objects.get_or_create(username=DEMO_EMAIL, defaults={"email": DEMO_EMAIL})
            if created:
                user.set_password(DEMO_PASSWORD)
                user.save()
            tenant = Tenant.objects.filter(slug="demo").first()
            if tenant is None:
                tenant_create(slug="demo", name="Demo team", owner=user)
            else:
                membership_add(tenant=tenant, user=user, role=Role.OWNER)
        self.stdout.write(f"Demo login: {DEMO_EMAIL} / {DEMO_PASSWORD}")
