"""Deployed endpoints: the list with its deploy form, one endpoint's page (status, redeploy, playground, usage,
snippets) and two endpoints side by side.

The server renders what it owns and what is small: the tenant's endpoints, the succeeded jobs one can deploy, and
code snippets with the real base URL. Everything that moves (status while deploying, usage, streamed tokens) is
read by the page's scripts from the same REST API under /v1 that SDK users call, so the pages and the API cannot
disagree about an endpoint."""

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render

from apps.dashboard.access import require_tenant, tenant_object_or_404
from apps.jobs.selectors import fine_tuned_models
from apps.tenancy.selectors import active_api_keys_for_tenant

# The deploy and redeploy forms offer the newest succeeded jobs; an older one is still deployable through the API.
DEPLOYABLE_JOBS_SHOWN = 100
# What a new endpoint generates with unless its request says otherwise (the API's own defaults apply if omitted).
DEFAULT_GENERATION = {"max_tokens": 128, "temperature": 0.7, "top_p": 1.0}


def _endpoint_selectors():
    """apps.endpoints is built alongside these pages; importing it when a page is served (not when the URLconf is
    loaded) keeps the rest of the dashboard working while that app is being written."""
    from apps.endpoints import selectors

    return selectors


def _endpoint_get(*, tenant, public_id: str):
    return _endpoint_selectors().endpoint_get(tenant=tenant, public_id=public_id)


def _endpoint_list(*, tenant) -> list:
    # The dashboard is the tenant's own view: every endpoint, not a key's narrowed list.
    return list(_endpoint_selectors().endpoints_visible(tenant=tenant))


def _deployable_jobs(tenant) -> list:
    return list(fine_tuned_models(tenant=tenant)[:DEPLOYABLE_JOBS_SHOWN])


def _api_base(request) -> str:
    # What a client outside the browser must call: the host and scheme this page was served from.
    return request.build_absolute_uri("/v1")


def _task(endpoint) -> str:
    return getattr(endpoint, "task", "") or "causal_lm"


def _model_name(endpoint) -> str:
    job = getattr(endpoint, "job", None)
    return getattr(job, "fine_tuned_model", "") or getattr(endpoint, "model", "") or ""


def endpoint_snippets(*, api_base: str, name: str, public_id: str, task: str) -> dict[str, str]:
    """Ready-to-paste client code for one endpoint. Generative endpoints speak OpenAI's API (model = the endpoint's
    name); a classifier has no OpenAI counterpart, so its snippets call the predict route."""
    if task == "classification":
        url = f"{api_base}/endpoints/{public_id}/predict"
        curl = (
            f'curl {url} \\\n  -H "Authorization: Bearer $TUNEHOUSE_API_KEY" \\\n'
            f'  -H "Content-Type: application/json" \\\n  -d \'{{"input": ["This is great!"]}}\''
        )
        python = (
            "import os\n\nimport httpx\n\n"
            "response = httpx.post(\n"
            f'    "{url}",\n'
            '    headers={"Authorization": f"Bearer {os.environ[\'TUNEHOUSE_API_KEY\']}"},\n'
            '    json={"input": ["This is great!"]},\n'
            ")\n"
            'print(response.json()["predictions"])\n'
        )
        return {"curl": curl, "python": python}
    if task == "seq2seq":
        curl = (
            f'curl {api_base}/completions \\\n  -H "Authorization: Bearer $TUNEHOUSE_API_KEY" \\\n'
            f'  -H "Content-Type: application/json" \\\n'
            f'  -d \'{{"model": "{name}", "prompt": "Translate: hello", "max_tokens": 64}}\''
        )
        python = (
            "import os\n\nfrom openai import OpenAI\n\n"
            f'client = OpenAI(base_url="{api_base}", api_key=os.environ["TUNEHOUSE_API_KEY"])\n'
            f'completion = client.completions.create(model="{name}", prompt="Translate: hello", max_tokens=64)\n'
            "print(completion.choices[0].text)\n"
        )
        return {"curl": curl, "python": python}
    curl = (
        f'curl {api_base}/chat/completions \\\n  -H "Authorization: Bearer $TUNEHOUSE_API_KEY" \\\n'
        f'  -H "Content-Type: application/json" \\\n'
        f'  -d \'{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello!"}}], "stream": true}}\''
    )
    python = (
        "import os\n\nfrom openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{api_base}", api_key=os.environ["TUNEHOUSE_API_KEY"])\n'
        "stream = client.chat.completions.create(\n"
        f'    model="{name}",\n'
        '    messages=[{"role": "user", "content": "Hello!"}],\n'
        "    max_tokens=128,\n"
        "    stream=True,\n"
        ")\n"
        "for chunk in stream:\n"
        '    print(chunk.choices[0].delta.content or "", end="", flush=True)\n'
    )
    return {"curl": curl, "python": python}


@login_required
def endpoints(request):
    tenant = require_tenant(request).tenant
    context = {
        "endpoints": _endpoint_list(tenant=tenant),
        "deployable_jobs": _deployable_jobs(tenant),
        "defaults": DEFAULT_GENERATION,
    }
    return render(request, "dashboard/endpoints.html", context)


@login_required
def endpoint_detail(request, public_id: str):
    endpoint = tenant_object_or_404(request, _endpoint_get, public_id, "endpoint")
    task = _task(endpoint)
    api_base = _api_base(request)
    scoped = {key.pk for key in endpoint.api_keys.all()}
    context = {
        "endpoint": endpoint,
        "task": task,
        "model_name": _model_name(endpoint),
        # The tenant's active keys, ticked where limited to this endpoint; only owners and admins may change them.
        "api_keys": [
            {"id": key.public_id, "name": key.name, "prefix": key.prefix, "scoped": key.pk in scoped}
            for key in active_api_keys_for_tenant(tenant=endpoint.tenant)
        ],
        "can_manage_keys": require_tenant(request).can_manage,
        "deployable_jobs": _deployable_jobs(endpoint.tenant),
        "api_base": api_base,
        "snippets": endpoint_snippets(api_base=api_base, name=endpoint.name, public_id=endpoint.public_id, task=task),
        # The script reads the live object from the API; it needs only the id and the task to start.
        "page_data": {"id": endpoint.public_id, "name": endpoint.name, "task": task, "status": endpoint.status},
    }
    return render(request, "dashboard/endpoint_detail.html", context)


@login_required
def endpoint_compare(request):
    tenant = require_tenant(request).tenant
    chosen = []
    for key in ("a", "b"):
        public_id = request.GET.get(key, "").strip()
        if not public_id:
            chosen.append(None)
            continue
        endpoint = _endpoint_get(tenant=tenant, public_id=public_id)
        if endpoint is None:
            raise Http404("No such endpoint.")
        chosen.append(endpoint)
    first, second = chosen
    both = first is not None and second is not None
    context = {
        "first": first,
        "second": second,
        "both": both,
        "endpoints": _endpoint_list(tenant=tenant),
        "columns": [
            {"key": key, "id": endpoint.public_id, "name": endpoint.name, "task": _task(endpoint)}
            for key, endpoint in (("a", first), ("b", second))
        ]
        if both
        else [],
    }
    return render(request, "dashboard/endpoint_compare.html", context)
