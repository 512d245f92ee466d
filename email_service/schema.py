"""OpenAPI adjustments that drf-spectacular cannot express per serializer."""


def close_public_shape(result, generator, request, public):
    """Mark the public view of a request as closed, so it and the staff view never both match."""
    schemas = result.get("components", {}).get("schemas", {})
    if "EmailRequestPublic" in schemas:
        schemas["EmailRequestPublic"]["additionalProperties"] = False
    return result
