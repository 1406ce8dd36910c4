import Foundation
import GRDB
import PoolAPI

extension SQLiteStore {
    /// The schema, one migration per change; applied when the store opens.
    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("1-users-appliances-flavors") { db in
            try db.create(table: "user") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("superuser", .boolean).notNull()
                table.column("maxInstances", .integer).notNull()
                table.column("tokenDigest", .text).notNull().unique()
                table.column("createdAt", .datetime).notNull()
            }
            try db.create(table: "appliance") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("ownerID", .integer).notNull().references("user")
                table.column("enabled", .boolean).notNull()
                table.column("tokenDigest", .text).notNull().unique()
                table.column("version", .text)
                table.column("latitude", .double)
                table.column("longitude", .double)
                table.column("dynamicImages", .boolean).notNull().defaults(to: false)
                table.column("lastSeen", .datetime)
                table.column("createdAt", .datetime).notNull()
            }
            try db.create(table: "flavor") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("description", .text).notNull()
                table.column("vcpus", .integer).notNull()
                table.column("memory", .integer).notNull()
                table.column("disk", .integer).notNull()
                table.column("networkUp", .integer).notNull()
                table.column("networkDown", .integer).notNull()
                table.column("rate", .integer).notNull()
                table.column("ask", .integer).notNull()
                table.column("hot", .integer).notNull()
                table.column("active", .boolean).notNull()
                // A flavor is its specs: two names for one size are refused.
                table.uniqueKey(["vcpus", "memory", "disk", "networkUp", "networkDown"])
            }
        }
        migrator.registerMigration("2-images-wisps-instances") { db in
            try db.create(table: "image") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("url", .text).notNull()
                table.column("sha256", .text)
                table.column("diskFormat", .text).notNull()
            }
            try db.create(table: "wisp") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("ownerID", .integer).notNull().references("user")
                table.column("imageID", .integer).references("image")
                table.column("dynamicImageURL", .text)
                table.column("sshKeys", .text).notNull()
                table.column("postCreate", .text).notNull()
                table.column("callbackURL", .text)
                table.column("isDefault", .boolean).notNull()
                table.column("isSystemDefault", .boolean).notNull()
            }
            try db.create(table: "instance") { table in
                table.autoIncrementedPrimaryKey("id")
                // Names are the pool's identity for instances: one appliance
                // cannot overwrite another's record by reusing a name.
                table.column("name", .text).notNull().unique()
                table.column("applianceID", .integer).notNull().references("appliance")
                table.column("ownerID", .integer).notNull().references("user")
                table.column("wispID", .integer).references("wisp")
                table.column("state", .integer).notNull()
                table.column("flavor", .jsonText)
                table.column("ask", .integer)
                table.column("expires", .datetime)
                table.column("address", .text)
                table.column("ipAddresses", .jsonText).notNull()
                table.column("consoleTail", .jsonText).notNull()
                table.column("createdAt", .datetime).notNull()
                table.column("updatedAt", .datetime).notNull()
            }
        }
        migrator.registerMigration("3-check-ins-actions-reservations") { db in
            try db.alter(table: "appliance") { table in
                table.add(column: "stats", .jsonText)
            }
            try db.alter(table: "instance") { table in
                table.add(column: "callbackURL", .text)
                table.add(column: "lastError", .text)
                table.add(column: "reportedAt", .datetime)
            }
            try db.execute(sql: "UPDATE instance SET reportedAt = updatedAt")
            try db.create(table: "action") { table in
                table.primaryKey("id", .text)
                table.column("instanceID", .integer).notNull().indexed().references("instance", onDelete: .cascade)
                table.column("applianceID", .integer).notNull().indexed().references("appliance", onDelete: .cascade)
                table.column("kind", .text).notNull()
                table.column("flavor", .jsonText)
                table.column("expires", .datetime)
                table.column("createdAt", .datetime).notNull()
                table.column("doneAt", .datetime)
            }
            try db.create(table: "reservation") { table in
                table.primaryKey("id", .text)
                table.column("userID", .integer).notNull().references("user")
                // One reservation per instance at a time.
                table.column("instanceID", .integer).notNull().unique().references("instance", onDelete: .cascade)
                table.column("flavor", .text)
                table.column("wispID", .integer).references("wisp")
                table.column("callbackURL", .text)
                table.column("createdAt", .datetime).notNull()
                table.column("expiresAt", .datetime).notNull()
            }
        }
        migrator.registerMigration("4-image-kernel-boot-state-reason") { db in
            try db.alter(table: "image") { table in
                table.add(column: "kernelBoot", .jsonText)
            }
            try db.alter(table: "instance") { table in
                table.add(column: "stateReason", .text)
            }
        }
        migrator.registerMigration("5-user-api-templates") { db in
            try db.alter(table: "user") { table in
                table.add(column: "uuid", .text)
                table.add(column: "managerID", .integer).references("user")
                table.add(column: "leaseSeconds", .integer)
            }
            try db.execute(sql: "UPDATE user SET uuid = lower(hex(randomblob(16)))")
            try db.create(index: "user_uuid", on: "user", columns: ["uuid"], unique: true)
            try db.alter(table: "appliance") { table in
                table.add(column: "region", .text)
            }
            try db.create(table: "template") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("wispID", .integer).notNull().references("wisp")
                table.column("flavorID", .integer).notNull().references("flavor")
                table.column("hotStarts", .integer).notNull()
                table.column("createdAt", .datetime).notNull()
            }
            try db.alter(table: "instance") { table in
                table.add(column: "uuid", .text)
                table.add(column: "imageID", .integer).references("image")
                table.add(column: "templateID", .integer).references("template", onDelete: .setNull)
                table.add(column: "warm", .boolean).notNull().defaults(to: false)
                table.add(column: "preemptible", .boolean).notNull().defaults(to: true)
                table.add(column: "topic", .text)
            }
            try db.execute(sql: "UPDATE instance SET uuid = lower(hex(randomblob(16)))")
            try db.create(index: "instance_uuid", on: "instance", columns: ["uuid"], unique: true)
            // Users given access to an instance besides its owner.
            try db.create(table: "instanceUser") { table in
                table.column("instanceID", .integer).notNull().references("instance", onDelete: .cascade)
                table.column("userID", .integer).notNull().references("user", onDelete: .cascade)
                table.column("addedAt", .datetime).notNull()
                table.primaryKey(["instanceID", "userID"])
            }
        }
        migrator.registerMigration("6-launch-timeline") { db in
            // When each instance reached each launch phase (see LaunchPhase).
            try db.create(table: "timelineEntry") { table in
                table.column("instanceID", .integer).notNull().references("instance", onDelete: .cascade)
                table.column("phase", .text).notNull()
                table.column("at", .double).notNull()
                table.column("detail", .text)
                table.primaryKey(["instanceID", "phase"])
            }
        }
        migrator.registerMigration("7-user-enabled") { db in
            try db.alter(table: "user") { table in
                table.add(column: "enabled", .boolean).notNull().defaults(to: true)
            }
        }
        migrator.registerMigration("8-signing-key") { db in
            // The pool's Ed25519 key, which signs what appliances are told.
            try db.create(table: "signingKey") { table in
                table.column("id", .integer).primaryKey().check { $0 == 1 }
                table.column("privateKey", .blob).notNull()
                table.column("createdAt", .datetime).notNull()
            }
        }
        migrator.registerMigration("9-ssh-keys-user-data") { db in
            // Users' own SSH public keys (`/v1/ssh-key`).
            try db.create(table: "sshKey") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("uuid", .text).notNull().unique()
                table.column("userID", .integer).notNull().references("user", onDelete: .cascade)
                table.column("name", .text).notNull()
                table.column("publicKey", .text).notNull()
                table.column("fingerprint", .text).notNull()
                table.column("createdAt", .datetime).notNull()
                table.uniqueKey(["userID", "name"])
                table.uniqueKey(["userID", "fingerprint"])
            }
            // What a create asked for: the chosen keys' lines (newline-separated,
            // copied at the create) and the user-data part.
            try db.alter(table: "instance") { table in
                table.add(column: "sshKeys", .text)
                table.add(column: "userData", .text)
                // Where its appliance says users reach its SSH server (JSON).
                table.add(column: "ssh", .text)
            }
        }
        migrator.registerMigration("10-guest-keys-catalogue-edits") { db in
            try db.alter(table: "image") { table in
                // The guest user cloud-init gives the SSH keys to (nil: unknown,
                // so keys are not changed in running guests).
                table.add(column: "loginUser", .text)
                // Inactive images take no new instances; running ones keep theirs.
                table.add(column: "active", .boolean).notNull().defaults(to: true)
            }
            // A `keys` action: the login user's whole key list, and a script to
            // start once after it.
            try db.alter(table: "action") { table in
                table.add(column: "keys", .jsonText)
                table.add(column: "user", .text)
                table.add(column: "run", .text)
            }
            try db.alter(table: "instance") { table in
                // The `keys` action that re-keys a handed-out warm instance; until
                // its appliance reports it applied, the new owner sees BUILD.
                table.add(column: "handOutAction", .text)
                // The newest `keys` action its appliance reported applied.
                table.add(column: "keysApplied", .text)
            }
        }
        migrator.registerMigration("11-instance-indexes") { db in
            // An appliance's and a user's instances, and a template's warm ones,
            // without a scan of every record (PostgreSQL's schema has these):
            // each new record's room check counted all of them.
            try db.create(index: "instance_appliance", on: "instance", columns: ["applianceID"])
            try db.create(index: "instance_owner", on: "instance", columns: ["ownerID"])
            try db.execute(sql: "CREATE INDEX instance_warm ON instance (templateID) WHERE warm")
        }
        return migrator
    }
}
