// Swagger UI over the document Envoy serves on the same origin (no CORS, no CDN). Try-it-out
// calls go to the document's server "/", i.e. this Envoy, with the headers of "Authorize"
// (x-api-key, x-api-secret) and of each operation's parameters (x-tenant-id, x-sub-tenant-id).
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/api/v1/openapi.json",
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis],
    deepLinking: true,
    filter: true,                // the search box: filters operations by tag or path
    displayOperationId: true,
    displayRequestDuration: true,
    validatorUrl: null,          // no badge fetched from swagger.io
  });
});
