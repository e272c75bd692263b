"""Bad input to every monitor view and API endpoint answers 4xx with ``{"error": ...}`` -- never a 500
(issue 14). Every URL of carrot/urls.py is driven, GET and POST, by a staff user (so the input gets past
the access check), with hostile path values, query strings and bodies: NUL characters, lone surrogates,
non-numeric, zero, negative and huge pages, ids past any integer column, JSON bodies nested 100,000
deep, values of the wrong JSON type, and strings of a megabyte.
"""
import json

import pytest
from django.test import Client
from django.urls import URLPattern, reverse
from hypothesis import HealthCheck, given, settings, strategies as st

from carrot import urls as carrot_urls

pytestmark = [pytest.mark.django_db, pytest.mark.no_broker]

HYPOTHESIS = dict(deadline=None, max_examples=40, suppress_health_check=list(HealthCheck), derandomize=True)

NASTY_TEXT = ['\x00', 'a\x00b', '%ED%A0%80', '', ' ', '0', '-1', '1e9', '9' * 40, 'x' * 100_000,
              '../../etc/passwd', '<script>alert(1)</script>', '%00', '\u202e', 'null', '[]', '{}',
              'requeue', 'delete', 'send', 'run', 'active', 'default']
NASTY_INT = [0, 1, 2 ** 31, 2 ** 63, 2 ** 64, 10 ** 30]
PAGES = ['0', '-1', 'abc', '1.5', '\x00', '9' * 5000, str(10 ** 30), '', '1', ' 2 ', '1e3']

text = st.one_of(st.sampled_from(NASTY_TEXT), st.text(st.characters(blacklist_categories=['Cs']), max_size=50))
json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                    st.sampled_from(NASTY_TEXT)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.sampled_from(
                                                      ['uuid', 'q', 'queue', 'active', 'task', 'task_args',
                                                       'content', 'interval_count', 'page']), inner, max_size=4)),
                          max_leaves=8)
FIELDS = ['uuid', 'q', 'queue', 'active', 'next', 'task_name', 'task', 'interval_type', 'interval_count',
          'task_args', 'content', 'page', 'page_size', 'tab', 'log_level']


def deep(depth, kind='list'):
    return ('[' * depth + ']' * depth) if kind == 'list' else ('{"a":' * depth + '1' + '}' * depth)


def patterns():
    for entry in carrot_urls.urlpatterns:
        assert isinstance(entry, URLPattern)
        yield entry


ROUTES = list(patterns())


def path_for(pattern: URLPattern, values: dict) -> str:
    kwargs = {}
    for name, converter in pattern.pattern.converters.items():
        kwargs[name] = values.get(type(converter).__name__, 'x')
    try:
        return reverse(f'carrot:{pattern.name}', kwargs=kwargs)
    except Exception:  # the value cannot be put in this URL (e.g. '/' in a str segment): a plain one
        kwargs = {name: ('1' if type(c).__name__ == 'IntConverter' else 'x')
                  for name, c in pattern.pattern.converters.items()}
        return reverse(f'carrot:{pattern.name}', kwargs=kwargs)


@pytest.fixture
def staff(django_user_model):
    user = django_user_model.objects.create_user('fuzz', password='x', is_staff=True)
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


def check(response, where):
    assert response.status_code < 500, f'{where} answered {response.status_code}'
    if response.status_code == 400 or (response.status_code >= 400 and '/api/' in where):
        assert response['Content-Type'].startswith('application/json'), \
            f'{where} answered {response.status_code} without JSON: {response.content[:200]!r}'
        body = json.loads(response.content)
        assert isinstance(body.get('error'), str) and body['error'], f'{where}: {body}'


@pytest.mark.parametrize('route', ROUTES, ids=lambda r: r.name)
@settings(**HYPOTHESIS)
@given(segment=text, number=st.sampled_from(NASTY_INT),
       query=st.dictionaries(st.sampled_from(FIELDS), st.one_of(text, st.sampled_from(PAGES)), max_size=4))
def test_every_url_answers_bad_query_input_without_a_500(staff, route, segment, number, query):
    path = path_for(route, {'StringConverter': segment, 'IntConverter': number})
    check(staff.get(path, query), f'GET {path} {query!r}')
    check(staff.post(path, query), f'POST {path} {query!r}')


@pytest.mark.parametrize('route', ROUTES, ids=lambda r: r.name)
@settings(**HYPOTHESIS)
@given(body=st.one_of(json_value, st.sampled_from(['deep-list', 'deep-dict', 'not json', 'huge'])))
def test_every_url_answers_bad_json_bodies_without_a_500(staff, route, body):
    path = path_for(route, {'StringConverter': 'requeue', 'IntConverter': 1})
    if body == 'deep-list':
        data = deep(100_000)
    elif body == 'deep-dict':
        data = deep(100_000, 'dict')
    elif body == 'not json':
        data = '{"uuid": '
    elif body == 'huge':
        data = json.dumps({'q': 'x' * 1_000_000, 'uuid': ['y' * 10_000] * 50})
    else:
        data = json.dumps(body)
    check(staff.post(path, data, content_type='application/json'), f'POST {path} {data[:80]!r}')


@pytest.mark.parametrize('route', ROUTES, ids=lambda r: r.name)
def test_every_url_answers_the_listed_attacks_without_a_500(staff, route):
    """The cases of the issue, each on every URL: a NUL in a search or an id, non-numeric and zero pages
    on every tab, a 100,000-deep JSON body, a value of the wrong JSON type."""
    for segment in ['\x00', 'a\x00', 'x' * 5000]:
        path = path_for(route, {'StringConverter': segment, 'IntConverter': 2 ** 64})
        check(staff.get(path), f'GET {path!r}')
        check(staff.post(path), f'POST {path!r}')
    path = path_for(route, {'StringConverter': 'requeue', 'IntConverter': 1})
    for page in PAGES:
        for field in ('page', 'page_size'):
            check(staff.get(path, {field: page}), f'GET {path} {field}={page[:20]!r}')
    for search in ['\x00', 'a\x00b', '%ED%A0%80']:
        check(staff.get(path, {'q': search, 'queue': search}), f'GET {path} q={search!r}')
        check(staff.post(path, {'q': search, 'uuid': search, 'queue': search}), f'POST {path} q={search!r}')
    for data in [deep(100_000), deep(100_000, 'dict'), json.dumps({'uuid': {'a': 1}, 'q': ['x'], 'active': [1]}),
                 json.dumps({'uuid': [[['x']]], 'queue': None, 'task_args': {'a': 1}, 'interval_count': 'x'}),
                 json.dumps([1, 2]), json.dumps('text'), json.dumps({'uuid': ['\x00']}),
                 json.dumps({'q': '\ud800', 'uuid': ['\udcff'], 'task_name': '\ud800'})]:
        check(staff.post(path, data, content_type='application/json'), f'POST {path} {data[:60]!r}')
