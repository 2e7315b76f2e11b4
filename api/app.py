"""The Quart (quart-trio) application: routes, limits and error handling, nothing else.

`create_app(services)` gets everything it serves from one `Services` object built by
node/daemon.py (router, config, pool, store, mesh façade); handlers reach it through
`current_app.config["MESH"]`. The app never opens sockets or starts tasks of its own:
Hypercorn serves it inside the node's trio nursery.
"""

from __future__ import annotations

from quart_trio import QuartTrio

from api import errors
from api.agent_routes import bp as agents_bp
from api.anthropic_routes import bp as anthropic_bp
from api.auth import AuthMiddleware
from api.batch_routes import bp as batch_bp
from api.dashboard_routes import bp as dashboard_bp
from api.drain import DrainUnreadBody
from api.key_routes import bp as keys_bp
from api.mesh_routes import bp as mesh_bp
from api.node_routes import bp as nodes_bp
from api.model_routes import bp as models_bp
from api.ollama_routes import bp as ollama_bp
from api.openai_routes import bp as openai_bp
from api.responses_routes import bp as responses_bp
from api.speech_routes import bp as speech_bp
from api.tokenize_routes import bp as tokenize_bp


def create_app(services) -> QuartTrio:
    app = QuartTrio("inference-mesh")
    # Quart cuts responses after 60 s by default: long streams must not be cut.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 120
    app.config["MAX_CONTENT_LENGTH"] = services.config.max_body_bytes
    app.config["MESH"] = services
    app.register_blueprint(openai_bp)
    app.register_blueprint(responses_bp)
    app.register_blueprint(anthropic_bp)
    app.register_blueprint(ollama_bp)
    app.register_blueprint(speech_bp)
    app.register_blueprint(tokenize_bp)
    app.register_blueprint(batch_bp)
    app.register_blueprint(agents_bp)
    app.register_blueprint(mesh_bp)
    app.register_blueprint(nodes_bp)
    app.register_blueprint(models_bp)
    app.register_blueprint(keys_bp)
    app.register_blueprint(dashboard_bp)
    errors.install(app)

    @app.after_request
    async def _count(response):
        from quart import request
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        services.metrics.requests.labels(rule, str(response.status_code)).inc()
        return response

    app.asgi_app = DrainUnreadBody(
        AuthMiddleware(app.asgi_app, services.keyring,
                       in_flight=services.in_flight),
        limit=services.config.max_body_bytes)
    return app
