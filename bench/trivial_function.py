"""Control for the HTTP benchmarks: the same server, a function that does nothing.

It reads the delivery and answers 201, so its request rate is what
functions-framework's ASGI mode (gunicorn with uvicorn workers) allows on this
machine at this moment; the writer's rate is read against it.
"""

from starlette.responses import Response


async def trivial(request):
    await request.body()
    return Response(b'{"status": "stored"}', 201, media_type="application/json")
