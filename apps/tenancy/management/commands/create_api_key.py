import json

from django.core.management.base import BaseCommand, CommandError

from apps.tenancy.models import Tenant
from apps.tenancy.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a tenant; the key is printed once (JSON) and only its hash is stored."

    def add_arguments(self, parser):
        parser.add_argument("tenant_slug")
        parser.add_argument("--name", required=True)

    def handle(self, *args, tenant_slug, name, **options):
        tenant = Tenant.objects.filter(slug=tenant_slug).first()
        if tenant is None:
            raise CommandError(f"No tenant with slug '{tenant_slug}'.")
        key = api_key_create(tenant=tenant, user=None, name=name)
        self.stdout.write(json.dumps({"tenant": tenant.slug, "id": key.api_key.public_id, "api_key": key.secret}))
