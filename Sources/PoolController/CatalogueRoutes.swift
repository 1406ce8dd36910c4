import Foundation
import Hummingbird
import PoolAPI

/// `/v1/server-template` and `/v1/wisp`: the templates users launch from,
/// and, for superusers, changing templates and wisps as `corral pool
/// template|wisp` does. Nothing running is lost: instances already made
/// keep what they booted; warm instances of what a template was are
/// retired, and the warm-pool pass builds new ones.
struct CatalogueRoutes: Sendable {
    let store: any PoolStore
    let warmPools: WarmPoolService

    func register(in group: RouterGroup<BasicRequestContext>) {
        group.get("server-template", use: templates)
        group.put("server-template/:id", use: changeTemplate)
        group.delete("server-template/:id", use: removeTemplate)
        group.get("wisp", use: wisps)
        group.put("wisp/:id", use: changeWisp)
        group.delete("wisp/:id", use: removeWisp)
    }

    /// `GET /v1/server-template`: 200 with every template; 401.
    @Sendable func templates(_ request: Request, context: BasicRequestContext) async throws -> Response {
        _ = try await authenticateUser(request, store: store)
        let templates = try await refusingPoolErrors { try await store.templates() }
        return try reply(.ok, ServerEnvelope(data: templates.map(ServerTemplate.init)))
    }

    /// `PUT /v1/server-template/ID` `{"wisp"?, "server-flavor"?,
    /// "hot-starts"?}` (at least one), superusers only: 200 with the
    /// template; 400 for another body, an unknown wisp or flavor; 401; 403;
    /// 404 for an unknown template.
    @Sendable func changeTemplate(_ request: Request, context: BasicRequestContext) async throws -> Response {
        try await requireSuperuser(request, "change templates")
        let name = try pathParameter(context, "id")
        let body = try decodeStrictBody(ServerTemplateChange.self, from: try await collectBody(request, upTo: maximumUserBody))
        guard body.wisp != nil || body.serverFlavor != nil || body.hotStarts != nil else {
            throw Refusal(.badRequest, "give at least one of 'wisp', 'server-flavor' and 'hot-starts'")
        }
        let wisp = try BodyField.text(body.wisp, "wisp")
        let flavor = try BodyField.text(body.serverFlavor, "server-flavor")
        let hotStarts = try BodyField.number(body.hotStarts, "hot-starts", in: 0...Template.maxHotStarts)
        let template = try await refusingPoolErrors {
            do {
                return try await store.setTemplate(name, wisp: wisp, flavor: flavor, hotStarts: hotStarts, at: Date())
            } catch PoolError.notFound(let what, let missing) where what != "template" {
                let field = what == "wisp" ? "wisp" : "server-flavor"
                throw PoolError.invalid(field: field, reason: "there is no \(what) '\(missing)'\(what == "flavor" ? " (or it is inactive)" : "")")
            }
        }
        warmPools.wake()
        return try reply(.ok, ServerEnvelope(data: [ServerTemplate(template)]))
    }

    /// `DELETE /v1/server-template/ID`, superusers only: 200 with the
    /// removed template; its warm instances are decommissioned, those
    /// handed out keep running. 401; 403; 404.
    @Sendable func removeTemplate(_ request: Request, context: BasicRequestContext) async throws -> Response {
        try await requireSuperuser(request, "remove templates")
        let name = try pathParameter(context, "id")
        let removed = try await refusingPoolErrors {
            guard let template = try await store.templates().first(where: { $0.name == name }) else {
                throw PoolError.notFound(what: "template", name: name)
            }
            _ = try await store.removeTemplate(name, at: Date())
            return template
        }
        warmPools.wake()
        return try reply(.ok, ServerEnvelope(data: [ServerTemplate(removed)]))
    }

    /// `GET /v1/wisp`, superusers only: 200 with every wisp; 401; 403.
    @Sendable func wisps(_ request: Request, context: BasicRequestContext) async throws -> Response {
        try await requireSuperuser(request, "see wisps")
        let wisps = try await refusingPoolErrors { try await store.wisps() }
        return try reply(.ok, ServerEnvelope(data: wisps.map(ServerWisp.init)))
    }

    /// `PUT /v1/wisp/ID` (see ``ServerWispChange``), superusers only: 200
    /// with the wisp; 400 for another body, an unknown or inactive image,
    /// a URL that is not http(s), a text that is not an OpenSSH public key,
    /// or a post-create that is not a `#cloud-config` mapping or a `#!`
    /// script of at most 64 KiB; 401; 403; 404 for an unknown wisp.
    @Sendable func changeWisp(_ request: Request, context: BasicRequestContext) async throws -> Response {
        try await requireSuperuser(request, "change wisps")
        let name = try pathParameter(context, "id")
        let body = try decodeStrictBody(ServerWispChange.self, from: try await collectBody(request, upTo: maximumUserBody))
        if body.serverImage != nil, body.dynamicImageURL != nil {
            throw Refusal(.badRequest, "field 'dynamic-image-url': give server-image or dynamic-image-url, not both")
        }
        var change = WispChange()
        change.image = try BodyField.text(body.serverImage, "server-image")
        change.dynamicImageURL = try body.dynamicImageURL.map { try BodyField.httpURL($0, "dynamic-image-url") }
        change.callbackURL = try body.callbackURL.map { url in try url.map { try BodyField.httpURL($0, "callback-url") } }
        if let keys = body.sshKeys {
            guard keys.count <= 100 else { throw Refusal(.badRequest, "field 'ssh-keys': at most 100 keys") }
            change.sshKeys = try keys.enumerated().map { index, text in
                do {
                    return try SSHPublicKey(text).line
                } catch {
                    throw Refusal(.badRequest, "field 'ssh-keys[\(index)]': the text \(error)")
                }
            }
        }
        if let postCreate = body.postCreate {
            if !postCreate.isEmpty, let problem = UserData.problem(postCreate) {
                throw Refusal(.badRequest, "field 'post-create': \(problem)")
            }
            change.postCreate = postCreate
        }
        guard !change.isEmpty else {
            throw Refusal(.badRequest, "give at least one of \(ServerWispChange.fieldNames.map { "'\($0)'" }.joined(separator: ", "))")
        }
        let wisp = try await refusingPoolErrors {
            do {
                return try await store.setWisp(name, change, at: Date()).wisp
            } catch PoolError.notFound(what: "image", let missing) {
                throw PoolError.invalid(field: "server-image", reason: "there is no active image '\(missing)'; GET /v1/server-image lists them")
            }
        }
        warmPools.wake()
        return try reply(.ok, ServerEnvelope(data: [ServerWisp(wisp)]))
    }

    /// `DELETE /v1/wisp/ID`, superusers only: 200 with the removed wisp;
    /// 401; 403; 404; 409 while a template or a live instance boots from it.
    @Sendable func removeWisp(_ request: Request, context: BasicRequestContext) async throws -> Response {
        try await requireSuperuser(request, "remove wisps")
        let name = try pathParameter(context, "id")
        let removed = try await refusingPoolErrors {
            guard let wisp = try await store.wisps().first(where: { $0.name == name }) else {
                throw PoolError.notFound(what: "wisp", name: name)
            }
            try await store.removeWisp(name)
            return wisp
        }
        return try reply(.ok, ServerEnvelope(data: [ServerWisp(removed)]))
    }

    private func requireSuperuser(_ request: Request, _ what: String) async throws {
        let caller = try await authenticateUser(request, store: store)
        guard caller.superuser else { throw Refusal(.forbidden, "only a superuser may \(what)") }
    }
}

extension ServerTemplate {
    init(_ template: Template) {
        self.init(name: template.name, wisp: template.wisp, serverFlavor: template.flavor, hotStarts: template.hotStarts)
    }
}

extension ServerWisp {
    init(_ wisp: Wisp) {
        self.init(
            name: wisp.name, owner: wisp.owner, serverImage: wisp.image, dynamicImageURL: wisp.dynamicImageURL, sshKeys: wisp.sshKeys,
            postCreate: wisp.postCreate, callbackURL: wisp.callbackURL)
    }
}
