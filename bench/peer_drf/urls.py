"""One route: POST /api/v1/authenticate answers whose key the Authorization header carries."""

from typing import Any

from django.urls import path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework_api_key.models import APIKey
from rest_framework_api_key.permissions import HasAPIKey


class Authenticate(APIView):
    """The library's documented pattern: HasAPIKey lets the call in, get_from_key says whose."""

    permission_classes = [HasAPIKey]

    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        key = request.META["HTTP_AUTHORIZATION"].split()[1]
        api_key = APIKey.objects.get_from_key(key)
        return Response({"prefix": api_key.prefix, "name": api_key.name})


urlpatterns = [path("api/v1/authenticate", Authenticate.as_view())]
