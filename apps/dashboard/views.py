"""Dashboard pages. They read through selectors and write through services, like the API; the browser's JavaScript
talks to the same REST API and websockets that SDK users get."""

from django import forms
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from apps.catalog.models import EntryKind, EntryStatus
from apps.catalog.selectors import catalog_list
from apps.core.csv_export import csv_text
from apps.dashboard.access import require_tenant, tenant_object_or_404
from apps.datasets.selectors import file_get, file_list, tokenizer_get, tokenizer_list
from apps.datasets.services import PREVIEW_MAX_EXAMPLES
from apps.endpoints.limits import tenant_inference_limits
from apps.tenancy.context import SESSION_TENANT_KEY
from apps.tenancy.models import INFERENCE_LIMIT_FIELDS, ApiKey, KeyPermissions
from apps.tenancy.selectors import api_keys_for_tenant, membership_get
from apps.tenancy.services import api_key_create, api_key_revoke, api_key_update, user_sign_up
from workers.ml.data.templates import CHAT_TEMPLATES
from workers.ml.tokenizer_training import TOKENIZER_ALGORITHMS


class SignUpForm(forms.Form):
    email = forms.EmailField()
    password = forms.CharField(widget=forms.PasswordInput, min_length=8)
    team_name = forms.CharField(max_length=120, label="Team name")

    def clean_password(self):
        password = self.cleaned_data["password"]
        validate_password(password)
        return password


def signup(request):
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user, tenant = user_sign_up(
                email=form.cleaned_data["email"],
                password=form.cleaned_data["password"],
                tenant_name=form.cleaned_data["team_name"],
            )
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                form.add_error(field if field in form.fields else None, errors)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            request.session[SESSION_TENANT_KEY] = tenant.pk
            return redirect("dashboard:home")
    return render(request, "registration/signup.html", {"form": form})


@login_required
@require_POST
def switch_tenant(request):
    try:
        tenant_id = int(request.POST.get("tenant_id", ""))
    except ValueError:
        raise Http404 from None
    if membership_get(user=request.user, tenant_id=tenant_id) is None:
        raise Http404("No such team.")
    request.session[SESSION_TENANT_KEY] = tenant_id
    return redirect("dashboard:home")


@login_required
def api_keys(request):
    context = require_tenant(request)
    new_secret = None
    if request.method == "POST":
        if not context.can_manage:
            raise Http404
        if request.POST.get("action") == "revoke":
            try:
                api_key_revoke(tenant=context.tenant, public_id=request.POST.get("key_id", ""))
            except ApiKey.DoesNotExist:
                raise Http404("No such key.") from None
            messages.success(request, "Key revoked.")
            return redirect("dashboard:api-keys")
        # Empty inputs are sent as "" and mean "no cap of the key's own".
        limits = {name: request.POST.get(name, "") for name in INFERENCE_LIMIT_FIELDS}
        if request.POST.get("action") == "limits":
            try:
                api_key_update(tenant=context.tenant, public_id=request.POST.get("key_id", ""), limits=limits)
            except ApiKey.DoesNotExist:
                raise Http404("No such key.") from None
            except ValidationError as exc:
                messages.error(request, " ".join(exc.messages))
            else:
                messages.success(request, "Key limits saved.")
            return redirect("dashboard:api-keys")
        try:
            created = api_key_create(
                tenant=context.tenant,
                user=request.user,
                name=request.POST.get("name", ""),
                limits=limits,
                permissions=request.POST.get("permissions", KeyPermissions.ALL),
            )
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            new_secret = created.secret
    return render(
        request,
        "dashboard/api_keys.html",
        {
            "api_keys": api_keys_for_tenant(tenant=context.tenant),
            "new_secret": new_secret,
            "team_limits": tenant_inference_limits(context.tenant),
            "key_permissions": KeyPermissions.choices,
        },
    )


@login_required
def file_detail(request, public_id: str):
    file = tenant_object_or_404(request, file_get, public_id, "file")
    return render(
        request,
        "dashboard/file_detail.html",
        {
            "file": file,
            "report": file.validation_report or {},
            "tokenizers": tokenizer_list(tenant=file.tenant).filter(status="ready"),
            # A pretrained model's own tokenizer previews what fine-tuning that model will train on.
            "model_tokenizers": [
                entry.model_id
                for entry in catalog_list()
                if entry.kind == EntryKind.PRETRAINED and entry.status == EntryStatus.READY
            ],
            "templates": CHAT_TEMPLATES,
            "preview_max": PREVIEW_MAX_EXAMPLES,
        },
    )


@login_required
def file_errors_csv(request, public_id: str):
    """The validation errors as CSV; cells are neutralised so a spreadsheet never runs user data as a formula."""
    file = tenant_object_or_404(request, file_get, public_id, "file")
    errors = (file.validation_report or {}).get("errors") or []
    body = csv_text(["line", "code", "message"], ([e.get("line"), e.get("code"), e.get("message")] for e in errors))
    response = HttpResponse(body, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{file.public_id}-errors.csv"'
    return response


@login_required
def tokenizers(request):
    context = require_tenant(request)
    return render(
        request,
        "dashboard/tokenizers.html",
        {
            "tokenizers": tokenizer_list(tenant=context.tenant),
            "files": file_list(tenant=context.tenant).exclude(status="error"),
            "algorithms": TOKENIZER_ALGORITHMS,
        },
    )


@login_required
def tokenizer_detail(request, public_id: str):
    tokenizer = tenant_object_or_404(request, tokenizer_get, public_id, "tokenizer")
    return render(request, "dashboard/tokenizer_detail.html", {"tokenizer": tokenizer, "report": tokenizer.report})
