"""Control for the HTTP benchmark: the same server, a function that does nothing.

It reads the delivery and answers 201, so its request rate is what
functions-framework (gunicorn gthread + Flask) allows on this machine at this
moment; the writer's rate is read against it.
"""


def trivial(request):
    request.get_data()
    return '{"status": "stored"}', 201, {"Content-Type": "application/json"}
