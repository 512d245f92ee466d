"""Pages of the list: page-number pagination whose large counts are shared for a few seconds."""

import hashlib

from django.core.cache import cache
from django.core.exceptions import EmptyResultSet
from django.core.paginator import Paginator
from django.utils.functional import cached_property
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination

from . import conf


class SharedCountPaginator(Paginator):
    """A paginator that counts a large result at most once per EMAIL_LIST_COUNT_CACHE_SECONDS.

    The first page of a filter comes off an index in a few milliseconds whatever the table's size,
    but an exact count reads every matching row: 25-50 ms for 900,000 SENT rows. A count above
    `SHARED_COUNT_FLOOR` is kept in the shared cache for the period, keyed by the count query
    itself, so callers of the same filter share it; smaller counts are cheap and always fresh.
    """

    SHARED_COUNT_FLOOR = 1000

    @cached_property
    def count(self):
        seconds = conf.list_count_cache_seconds()
        query = getattr(self.object_list, "query", None)
        if not seconds or query is None:
            return super().count
        try:
            sql, params = query.sql_with_params()
        except EmptyResultSet:  # a filter that can match nothing (`pk__in=[]`) has no SQL
            return super().count
        digest = hashlib.sha256(f"{sql}|{params!r}".encode()).hexdigest()
        key = f"email-service:list-count:{digest}"
        count = cache.get(key)
        if count is None:
            count = super().count
            if count > self.SHARED_COUNT_FLOOR:
                cache.set(key, count, timeout=seconds)
        return count

    def page(self, number):
        """The page's rows, read fresh: a shared count a few rows short must not cut the last page."""
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        return self._get_page(self.object_list[bottom : bottom + self.per_page], number, self)


class EmailRequestPagination(PageNumberPagination):
    django_paginator_class = SharedCountPaginator
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
        return parameters

    def get_paginated_response(self, data):
        response = super().get_paginated_response(data)
        # Set by the `search` filter: how many rows it decrypted, and whether its limit cut it short.
        search_scan = getattr(self.request, "search_scan", None)
        if search_scan is not None:
            response.data["search_scan"] = search_scan
        return response

    def get_paginated_response_schema(self, schema):
        schema = super().get_paginated_response_schema(schema)
        schema["properties"]["search_scan"] = {
            "type": "object",
            "description": "Only with `search`: rows read (newest first) and whether the limit stopped the "
            "search before the oldest row the other filters leave.",
            "properties": {
                "scanned": {"type": "integer"},
                "limit": {"type": "integer"},
                "limit_reached": {"type": "boolean"},
            },
            "required": ["scanned", "limit", "limit_reached"],
        }
        return schema

    def get_page_size(self, request):
        value = request.query_params.get(self.page_size_query_param)
        if value is not None and not (value.isdigit() and int(value) > 0):
            raise ValidationError({self.page_size_query_param: ["A positive whole number is required."]})
        return super().get_page_size(request)
