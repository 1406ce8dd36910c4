import Foundation
import PoolAPI

// The rows both stores read, as Codable records: one property per column
// (by the column's name), and what the API makes of them. SQLite decodes
// them with GRDB's `FetchableRecord`, PostgreSQL with `PostgresStore.Row.decode`.
// JSON columns stay text here and are decoded leniently in `model`, as the
// pool wrote them itself.

struct UserRecord: Decodable {
    var uuid: String
    var name: String
    var superuser: Bool
    var maxInstances: Int
    var manager: String?
    var leaseSeconds: Int?
    var createdAt: Date
    var enabled: Bool

    var model: User {
        User(
            id: uuid, name: name, superuser: superuser, maxInstances: maxInstances, manager: manager, leaseSeconds: leaseSeconds,
            createdAt: createdAt, enabled: enabled)
    }
}

struct ApplianceRecord: Decodable {
    var name: String
    var owner: String
    var enabled: Bool
    var version: String?
    var latitude: Double?
    var longitude: Double?
    var dynamicImages: Bool
    var region: String?
    var lastSeen: Date?
    var stats: String?
    var createdAt: Date

    var model: Appliance {
        Appliance(
            name: name, owner: owner, enabled: enabled, version: version, latitude: latitude, longitude: longitude,
            dynamicImages: dynamicImages, region: region, lastSeen: lastSeen, stats: StoreRules.decodeJSON(HypervisorStats.self, stats),
            createdAt: createdAt)
    }
}

struct FlavorRecord: Decodable {
    var name: String
    var description: String
    var vcpus: Int
    var memory: Int
    var disk: Int
    var networkUp: Int
    var networkDown: Int
    var rate: Int
    var ask: Int
    var hot: Int
    var active: Bool

    var model: Flavor {
        Flavor(
            name: name, description: description, vcpus: vcpus, memory: memory, disk: disk, networkUp: networkUp,
            networkDown: networkDown, rate: rate, ask: ask, hot: hot, active: active)
    }
}

struct ImageRecord: Decodable {
    var name: String
    var url: String
    var sha256: String?
    var diskFormat: String
    var kernelBoot: String?
    var loginUser: String?
    var active: Bool

    var model: Image {
        Image(
            name: name, url: url, sha256: sha256, diskFormat: diskFormat, kernelBoot: StoreRules.decodeJSON(KernelBoot.self, kernelBoot),
            loginUser: loginUser, active: active)
    }
}

struct WispRecord: Decodable {
    var name: String
    var owner: String
    var image: String?
    var dynamicImageURL: String?
    /// The keys' lines, newline-separated.
    var sshKeys: String
    var postCreate: String
    var callbackURL: String?
    var isDefault: Bool
    var isSystemDefault: Bool

    var model: Wisp {
        Wisp(
            name: name, owner: owner, image: image, dynamicImageURL: dynamicImageURL, sshKeys: StoreRules.scriptLines(sshKeys),
            postCreate: postCreate, callbackURL: callbackURL, isDefault: isDefault, isSystemDefault: isSystemDefault)
    }
}

struct ActionRecord: Decodable {
    var id: String
    var kind: String
    var instance: String
    var flavor: String?
    var expires: Date?
    var keys: String?
    var user: String?
    var run: String?

    var model: Action {
        Action(
            id: id, kind: Action.Kind(rawValue: kind) ?? .reboot, instance: instance, flavor: StoreRules.decodeJSON(InstanceFlavor.self, flavor),
            expires: expires.map { Int($0.timeIntervalSince1970) }, keys: StoreRules.decodeJSON([String].self, keys), user: user, run: run)
    }
}

struct ReservationRecord: Decodable {
    var id: String
    var user: String
    var instance: String
    var appliance: String
    var flavor: String?
    var wisp: String?
    var callbackURL: String?
    var expiresAt: Date

    var model: Reservation {
        Reservation(
            id: id, user: user, instance: instance, appliance: appliance, flavor: flavor, wisp: wisp, callbackURL: callbackURL,
            expires: Int(expiresAt.timeIntervalSince1970))
    }
}

/// A row of each store's `instanceQuery`.
struct InstanceRecord: Decodable {
    var uuid: String
    var name: String
    var appliance: String
    var owner: String
    var ownerUUID: String
    /// The uuids of the users it is shared with (SQLite: a JSON array; PostgreSQL: an array).
    var grantedUsers: [String]?
    var wisp: String?
    var image: String?
    var template: String?
    var warm: Bool
    var preemptible: Bool
    var topic: String?
    var state: Int
    var flavor: String?
    var ask: Int?
    var expires: Date?
    var address: String?
    var ipAddresses: String?
    var consoleTail: String?
    var ssh: String?
    var loginUser: String?
    var rekeying: Bool
    var callbackURL: String?
    var lastError: String?
    var stateReason: String?
    var reportedAt: Date?
    var createdAt: Date
    var updatedAt: Date

    var model: Instance {
        Instance(
            id: uuid, name: name, appliance: appliance, owner: owner, ownerID: ownerUUID,
            users: [ownerUUID] + (grantedUsers ?? []).filter { $0 != ownerUUID }, wisp: wisp, image: image, template: template, warm: warm,
            preemptible: preemptible, topic: topic, state: InstanceState(rawValue: state) ?? .inactive,
            flavor: StoreRules.decodeJSON(InstanceFlavor.self, flavor), ask: ask, expires: expires, address: address,
            ipAddresses: StoreRules.decodeJSON([IPAddress].self, ipAddresses) ?? [], consoleTail: StoreRules.decodeJSON([String].self, consoleTail) ?? [],
            ssh: StoreRules.decodeJSON(SSHEndpoint.self, ssh), loginUser: loginUser, rekeying: rekeying, callbackURL: callbackURL,
            lastError: lastError, stateReason: stateReason, reportedAt: reportedAt, createdAt: createdAt, updatedAt: updatedAt)
    }
}
