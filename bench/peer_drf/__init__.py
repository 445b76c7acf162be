"""The peer: djangorestframework-api-key on Django + DRF, served by gunicorn sync workers.

What a Python team would deploy instead of tokenservice to answer "whose key
is this?": `HasAPIKey` as the view's permission, then
`APIKey.objects.get_from_key` in the view, on SQLite with persistent database
connections. The bench starts it with `gunicorn --workers 2` (see servers.py)
and drives it with the same h2load as tokenservice's REST face.
"""
