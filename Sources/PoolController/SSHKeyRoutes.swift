import Foundation
import Hummingbird
import PoolAPI

/// `/v1/ssh-key`: a user's own SSH public keys, which their instances get
/// (all of them, unless a create names some).
struct SSHKeyRoutes: Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration

    func register(in group: RouterGroup<BasicRequestContext>) {
        group.get("ssh-key", use: list)
        group.post("ssh-key", use: add)
        group.delete("ssh-key/:id", use: delete)
    }

    /// `GET /v1/ssh-key`: 200 with the caller's keys, oldest first; 401.
    @Sendable func list(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let caller = try await authenticateUser(request, store: store)
        let keys = try await refusingPoolErrors { try await store.sshKeys(owner: caller.name) }
        return try reply(.ok, ServerEnvelope(data: keys.map(ServerSSHKey.init)))
    }

    /// `POST /v1/ssh-key` `{"name": NAME, "public-key": "ssh-ed25519 AAAA... comment"}`:
    /// 201 with the key and its fingerprint; 400 for a body outside the
    /// schema, a bad name or a text that is not an OpenSSH public key; 401;
    /// 409 for a name or a key the caller has already, or beyond
    /// `limits.max_ssh_keys_per_user`.
    @Sendable func add(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let caller = try await authenticateUser(request, store: store)
        let body = try decodeStrictBody(ServerSSHKeyCreation.self, from: try await collectBody(request, upTo: maximumUserBody))
        let name = try BodyField.text(body.name, "name")!
        if let problem = ResourceName.problem(name) { throw Refusal(.badRequest, "field 'name': the key's name \(problem)") }
        let key: SSHPublicKey
        do {
            key = try SSHPublicKey(try BodyField.text(body.publicKey, "public-key", maxBytes: SSHPublicKey.maximumLength + 2)!)
        } catch {
            throw Refusal(.badRequest, "field 'public-key': the text \(error) (paste the .pub file, e.g. ~/.ssh/id_ed25519.pub)")
        }
        let stored = try await refusingPoolErrors {
            try await store.addSSHKey(
                owner: caller.name, name: name, key: key, maxKeys: configuration.limits.maxSSHKeysPerUser, at: Date())
        }
        return try reply(.created, ServerEnvelope(data: [ServerSSHKey(stored)]))
    }

    /// `DELETE /v1/ssh-key/ID` (an id or a name): 200 with the removed key;
    /// 401; 404 if the caller has no such key. Instances made with it keep it.
    @Sendable func delete(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let caller = try await authenticateUser(request, store: store)
        let id = try pathParameter(context, "id")
        do {
            let removed = try await store.deleteSSHKey(owner: caller.name, key: id)
            return try reply(.ok, ServerEnvelope(data: [ServerSSHKey(removed)]))
        } catch PoolError.notFound {
            throw Refusal(.notFound, "you have no SSH key '\(id.prefix(64))'; GET /v1/ssh-key lists yours")
        }
    }
}

extension ServerSSHKey {
    init(_ key: SSHKey) {
        self.init(
            id: key.id, name: key.name, publicKey: key.publicKey, fingerprint: key.fingerprint,
            created: ServerInstance.timestamp(key.createdAt))
    }
}
